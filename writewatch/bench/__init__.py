"""The benchmark (``python -m writewatch bench``): writewatch's backends timed
against raw C references making the same kernel calls. Tooling, not product:
runner.py holds the scenarios and the report, reference.c the raw C side."""
