"""The serving process: ``python -m launcher.engine.server SPEC.json``.

Started and supervised by ``launch serve``. Reads the spec written by launch (model path = the
overlay, engine config, chat template, server address, API keys), checks once more that the chosen
engine can take the model and that lmdeploy reads the overlay as planned (``launcher.engine.readback``),
then runs lmdeploy's OpenAI api_server in this process. Called this way with backend='turbomind',
lmdeploy has no silent fallback to another engine.
"""

from __future__ import annotations

import sys

from launcher.engine.spec import serve_kwargs, turbomind_problem
from launcher.runtime.paths import read_spec

EXIT_ENGINE_UNAVAILABLE = 3
EXIT_OVERLAY_MISREAD = 4


def main(argv: list[str] | None = None) -> int:
    data = read_spec(argv, "launcher.engine.server")
    if data is None:
        return 2
    if data["backend"] == "turbomind":
        problem = turbomind_problem(data["model_path"], data["trust_remote_code"])
        if problem:
            print(f"launch engine_server: {problem}. Use --backend pytorch.", file=sys.stderr)
            return EXIT_ENGINE_UNAVAILABLE
    from launcher.engine.readback import readback_problem

    problem = readback_problem(data["model_path"], data["trust_remote_code"])
    if problem:
        print(f"launch engine_server: {problem}.", file=sys.stderr)
        return EXIT_OVERLAY_MISREAD
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
