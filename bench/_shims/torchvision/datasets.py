"""No datasets: torchdistill lists the classes of this module in its registry."""
