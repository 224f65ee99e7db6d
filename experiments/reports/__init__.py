"""Reports: tables and plots read from finished runs' workdirs (nothing is trained here).

report             per benchmark: final metrics over seeds, rounds to a target, diagnostics, plots
results_page       RESULTS.md's tables and claims from runs directories, in one call
claims             the paper's claims, each measured by a stated rule
reliability_table  RELIABILITY.md's table: faults injected against what was detected
bias_settings      aggregation bias by grid setting
data_scarcity      where federated methods overtake local-only as data shrinks
check_readme       `make run`'s results against the README's table
"""
