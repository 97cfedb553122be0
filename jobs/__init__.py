"""Ray Job entrypoints, one per stage, plus the submission client."""
