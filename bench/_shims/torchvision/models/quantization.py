"""Empty: torchdistill copies this module's namespace into its registry."""
