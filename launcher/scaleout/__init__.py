"""Past one engine: lmdeploy's proxy, its nodes, launch's watchdog and replicas."""
