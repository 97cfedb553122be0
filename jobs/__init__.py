"""Ray Job entrypoints, one per stage (``python -m jobs.<stage>``); ``vistr submit`` sends them to a cluster."""
