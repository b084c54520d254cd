"""Judging an edit, as its steps: prompt sets → text figures → images → classifiers → report.

``prompts`` reads the held-out prompt sets, ``text`` computes the text-side figures on the
encoder and the edited projections, ``images`` draws and judges images, ``classify`` holds the
zero-shot classifiers (shared with the debias loop), ``evaluate`` runs a report end to end and
``report``/``plots`` render it. The package sits at the commands layer (tests/test_layers.py).
"""
