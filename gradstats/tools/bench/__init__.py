"""`gradstats bench`: timing (timing.py), the op against PyTorch's backward per BN shape (op.py),
a whole training step (step.py), and their command line (cli.py)."""
