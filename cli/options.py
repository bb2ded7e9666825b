"""Command-line options shared by every command that talks to a model (chat, ask, info, discord)."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOption = Annotated[str | None, typer.Option(
    "--model", "-m", help="HF model dir, hub id or .gguf file (default: the embedded model); with "
    "--backend openai, the served model name.")]
QuantOption = Annotated[str | None, typer.Option("--quant", help="4bit | 8bit (bitsandbytes, GPU) | int4 | fp16 | "
                                                 "int8 (CPU) | none (full precision); default: 4bit on CUDA, int4 "
                                                 "on a CPU (fp16 where int4 has no fast kernel).")]
AdapterOption = Annotated[list[str] | None, typer.Option("--adapter", help="LoRA adapter directory (repeatable).")]
TrustPickleOption = Annotated[bool, typer.Option("--trust-pickle", help="Allow pickle (.bin) adapter weights.")]
BackendOption = Annotated[str | None, typer.Option("--backend", help="local (default) | openai: any "
                                                   "OpenAI-compatible server (vLLM, llama.cpp, Ollama, TGI).")]
BaseUrlOption = Annotated[str | None, typer.Option("--base-url", help="Server URL for --backend openai, "
                                                   "e.g. http://127.0.0.1:8000/v1.")]
ApiKeyEnvOption = Annotated[str | None, typer.Option("--api-key-env", help="Environment variable holding the "
                                                     "server's API key.")]
