"""What an edit writes and reads back — the output formats, the edit log, edits for sampling — and the reports judged on it."""
