"""ExecuTorch's own text LLM runner (``TextLLMRunner``, the C++ runner its Android and iOS apps
use) driving one of our ``.pte`` programs: proof that the program needs none of our Python.

The runner tokenizes with its own C++ reader of ``tokenizer.json``, calls the program's
``forward(tokens, input_pos)`` and reads its metadata methods (``export/executorch.py``).
"""

from __future__ import annotations

from pathlib import Path

# ExecuTorch's attention kernels (llama::custom_sdpa, update_cache), which programs exported by
# earlier versions of bibo-export call: they still run here.
import executorch.extension.llm.custom_ops.custom_ops  # noqa: F401
import executorch.kernels.quantized  # noqa: F401 - registers embedding_byte, embedding_4bit
from executorch.extension.llm.runner import GenerationConfig, TextLLMRunner

from ..artifacts import program_file, tokenizer_beside
from ..kernels.library import load_kernels_if_built
from ..tokenizer import END_OF_TEXT


class TextRunner:
    """Greedy text generation by ``TextLLMRunner`` from a ``.pte`` (or its export folder) and
    the ``tokenizer.json`` that travels with it."""

    def __init__(self, model: str | Path) -> None:
        tokenizer = tokenizer_beside(model)
        if tokenizer is None:
            raise ValueError(f"{model} holds no tokenizer.json: ExecuTorch's LLM runner needs "
                             "a model trained with one")
        hint = load_kernels_if_built()  # the runner shares this process's kernel registry
        try:
            self.runner = TextLLMRunner(str(program_file(model)), str(tokenizer))
        except RuntimeError as err:
            raise ValueError(f"ExecuTorch's TextLLMRunner cannot load {model}: {err}{hint}") \
                from None

    def generate(self, prompt: str, max_new_tokens: int) -> str:
        """The prompt's greedy continuation (temperature 0), cut at the end-of-text token."""
        pieces: list[str] = []
        # max_new_tokens counts the token prefill yields, as ours does. ``warming`` keeps the
        # runner from also printing each piece to stdout; the pieces still reach the callback.
        config = GenerationConfig(echo=False, max_new_tokens=max_new_tokens, temperature=0.0,
                                  warming=True)
        # Each call is a new sequence. A plain (non-warming) generate keeps the runner's position
        # for the next call; a warming one was seen to restart at 0 (executorch 1.4.1), but that
        # is not its documented contract, so the reset stays.
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
