"""HTTP with deadlines, and the client for lmdeploy's endpoints."""
