"""A stand-in for torch-fidelity in tests: its import needs a torchvision built for the installed
torch and its Inception weights a download, neither of which a CPU test machine has. It keeps the
one interface uce uses (``feature_extractor_inceptionv3.FeatureExtractorInceptionV3``), so uce's
FID path — per-rank feature extraction, the gather, the float64 statistics — runs for real."""
