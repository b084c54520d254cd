"""What each CLI command runs, as library calls: apply (recipe → plan → encode → statistics → solve → artifacts), the debias loop, sample, eval, transfer, verify."""
