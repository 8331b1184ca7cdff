"""The tools built on the gradstats library: the `gradstats` command (cli.py) with its
subcommands demo, bench, analyze and train, and what only they use (data sets, run logs,
checkpoints, option checks, process-group launch). Tools import the library; the library never
imports a tool."""
