"""The serving process: ``python -m launcher.engine_server SPEC.json``.

Started and supervised by ``launch serve``. Reads the spec written by launch (model path = the
overlay, engine config, chat template, server address, API keys), checks once more that the chosen
engine can take the model, then runs lmdeploy's OpenAI api_server in this process. Called this way
with backend='turbomind', lmdeploy has no silent fallback to another engine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .engine import serve_kwargs, turbomind_problem

EXIT_ENGINE_UNAVAILABLE = 3


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m launcher.engine_server SPEC.json", file=sys.stderr)
        return 2
    data = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    if data["backend"] == "turbomind":
        problem = turbomind_problem(data["model_path"], data["trust_remote_code"])
        if problem:
            print(f"launch engine_server: {problem}. Use --backend pytorch.", file=sys.stderr)
            return EXIT_ENGINE_UNAVAILABLE
    kwargs = serve_kwargs(data)
    print(
        f"launch engine_server: {kwargs['backend']} {type(kwargs['backend_config']).__name__}"
        f"(session_len={data['engine_config']['session_len']}, tp={data['engine_config']['tp']}) "
        f"on {kwargs['server_name']}:{kwargs['server_port']}, model {kwargs['model_path']}",
        file=sys.stderr,
        flush=True,
    )
    from lmdeploy.serve.openai.api_server import serve

    serve(**kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
