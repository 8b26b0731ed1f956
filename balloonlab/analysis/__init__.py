"""Log analysis: loading a run's JSON logs, the summary, the report and plots."""
