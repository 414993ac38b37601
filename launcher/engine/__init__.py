"""What mirrors lmdeploy: the engine settings and command, and the processes that run lmdeploy's servers."""
