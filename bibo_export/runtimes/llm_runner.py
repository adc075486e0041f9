"""ExecuTorch's own text LLM runner (``TextLLMRunner``, the C++ runner its Android and iOS apps
use) driving one of our ``.pte`` programs: proof that the program needs none of our Python.

The runner tokenizes with its own C++ reader of ``tokenizer.json``, calls the program's
``forward(tokens, input_pos)`` and reads its metadata methods (``export/executorch.py``).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import executorch.kernels.quantized  # noqa: F401 - registers embedding_byte (int8 tables)

from ..artifacts import program_file, tokenizer_beside
from ..tokenizer import END_OF_TEXT

EXTENSION = "executorch.extension.llm.runner._llm_runner"


def runner_extension() -> ModuleType:
    """The compiled runner module. Its package's ``__init__`` (executorch 1.4.1) also imports
    ``transformers`` for multimodal helpers we do not use, so the extension is loaded from its
    file when that package import is not available."""
    if EXTENSION in sys.modules:
        return sys.modules[EXTENSION]
    try:
        return importlib.import_module(EXTENSION)
    except ModuleNotFoundError as err:
        if err.name != "transformers":
            raise
    package = importlib.util.find_spec(EXTENSION.rpartition(".")[0])  # runs no __init__
    found = sorted(path for folder in package.submodule_search_locations
                   for path in Path(folder).glob("_llm_runner*.so"))
    if not found:
        raise ModuleNotFoundError(f"{EXTENSION} is not in this executorch installation",
                                  name=EXTENSION)
    spec = importlib.util.spec_from_file_location(EXTENSION, found[0])
    module = importlib.util.module_from_spec(spec)
    sys.modules[EXTENSION] = module
    spec.loader.exec_module(module)
    return module


class TextRunner:
    """Greedy text generation by ``TextLLMRunner`` from a ``.pte`` (or its export folder) and
    the ``tokenizer.json`` that travels with it."""

    def __init__(self, model: str | Path) -> None:
        tokenizer = tokenizer_beside(model)
        if tokenizer is None:
            raise ValueError(f"{model} holds no tokenizer.json: ExecuTorch's LLM runner needs "
                             "a model trained with one")
        self.extension = runner_extension()
        try:
            self.runner = self.extension.TextLLMRunner(str(program_file(model)), str(tokenizer))
        except RuntimeError as err:
            raise ValueError(f"ExecuTorch's TextLLMRunner cannot load {model}: {err}") from None

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        """The prompt's greedy continuation (temperature 0), cut at the end-of-text token."""
        pieces: list[str] = []
        # max_new_tokens counts the token prefill yields, as ours does. ``warming`` keeps the
        # runner from also printing each piece to stdout; the pieces still reach the callback.
        config = self.extension.GenerationConfig(echo=False, max_new_tokens=max_new_tokens,
                                                 temperature=0.0, warming=True)
        # Each call is a new sequence. A plain (non-warming) generate keeps the runner's position
        # for the next call; a warming one was seen to restart at 0 (1.4.1), but that is not
        # its documented contract, so the reset stays.
        self.runner.reset()
        try:
            self.runner.generate(prompt, config, token_callback=pieces.append)
        except UnicodeDecodeError:
            # The runner hands each token's bytes to Python as text; a byte-level token holding
            # part of a multi-byte character cannot be.
            raise ValueError("TextLLMRunner produced a token that is not whole UTF-8 text "
                             "(part of a multi-byte character)") from None
        text = "".join(pieces)
        return text.split(END_OF_TEXT)[0]
