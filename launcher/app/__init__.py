"""The only place that sequences the layers: serve."""
