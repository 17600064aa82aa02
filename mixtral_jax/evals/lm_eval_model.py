"""The model class lm-evaluation-harness runs, registered with it as `mixtral-jax` (importing this module
registers it; it needs the `eval` extra).

Requests are encoded as lm-eval's Hugging Face model encodes them (BOS first, an empty context replaced by
BOS), sorted by length and run `batch_size` at a time through the compiled scoring and decoding programs,
whose bucketed shapes let requests of similar lengths share a program.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from mixtral_jax import demo, prefill
from mixtral_jax.api import Mixtral, load
from mixtral_jax.errors import MixtralError
from mixtral_jax.tokenizer import StreamDecoder, Tokenizer

DEFAULT_MAX_GEN_TOKS = 256


@register_model("mixtral-jax")
class MixtralLM(TemplateLM):
    """A mixtral-jax model for lm-eval: `model` (a handle), or `checkpoint` (a folder; None: the built-in demo
    model) with `dtype`, `mesh` and `backend` as `mixtral_jax.load` takes them."""

    def __init__(self, model: Mixtral | None = None, checkpoint: str | None = None, dtype: str | None = None,
                 mesh: str | None = None, backend: str | None = None, tokenizer: str | Tokenizer | None = None,
                 batch_size: int | str = 8, max_length: int | None = None, progress: bool = True, **_: Any) -> None:
        super().__init__()
        if model is None:
            model = load(checkpoint, dtype=dtype, mesh=mesh, backend=backend) if checkpoint else \
                demo.load(dtype=dtype, mesh=mesh, backend=backend)
        if isinstance(tokenizer, str):
            tokenizer = Tokenizer(tokenizer)
        tokenizer = tokenizer or model.tokenizer
        if tokenizer is None:
            raise MixtralError("lm-eval needs a tokenizer: the checkpoint has none (pass tokenizer=FILE)")
        self.model = model.with_tokenizer(tokenizer)
        self.sp = tokenizer
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" is not measured here
        self.max_length = max_length or model.config.max_seq_len
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        return self.sp.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.sp.bos_id

    @property
    def tokenizer_name(self) -> str:
        return "mixtral-jax-sentencepiece"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """BOS, then the text's pieces (no BOS where `add_special_tokens` is False)."""
        return self.sp.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode(ids)

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(log p(continuation | context), whether greedy decoding gives the continuation) of each request;
        context and continuation together are cut from the left to the model's context and the one token
        predicted after it, as lm-eval's Hugging Face model cuts them."""
        rows = [(context + continuation)[-(self.max_length + 1):] for _, context, continuation in requests]
        n_cont = [len(continuation) for _, _, continuation in requests]

        def run(batch: list[int]) -> list[tuple[float, bool]]:
            logprobs, greedy = prefill.score_rows(self.model, [rows[i] for i in batch])
            return [(float(lp[-n_cont[i]:].sum(dtype=np.float64)), bool(g[-n_cont[i]:].all()))
                    for i, lp, g in zip(batch, logprobs, greedy)]

        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # the longest first
        return self._batched(order, lambda i: "", run, "loglikelihood", disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, in disjoint windows of the model's context (lm-eval's
        rolling windows, BOS first)."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for window in get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, 1):
                context, continuation = make_disjoint_window(window)
                windows.append(((text, ""), context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, where the task asks) continuations, each cut before its first stop sequence."""
        specs = [self._generation(context, dict(kwargs)) for context, kwargs in (req.args for req in requests)]

        def run(batch: list[int]) -> list[str]:
            until, max_new, temperature = specs[batch[0]][1:]
            return self._complete([specs[i][0] for i in batch], until, max_new, temperature)

        # Requests with the same settings batch together; within them, the longest first.
        order = sorted(range(len(specs)), key=lambda i: (repr(specs[i][1:]), -len(specs[i][0])))
        return self._batched(order, lambda i: repr(specs[i][1:]), run, "generate_until", disable_tqdm)

    def _generation(self, context: str, kwargs: dict) -> tuple[list[int], tuple[str, ...], int, float]:
        until = kwargs.pop("until", None) or []
        until = (until,) if isinstance(until, str) else tuple(until)
        max_new = int(kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
        ids = self.tok_encode(context)[-(self.max_length - max_new):]
        return ids, until, max_new, temperature

    def _complete(self, prompts: list[list[int]], until: tuple[str, ...], max_new: int,
                  temperature: float) -> list[str]:
        """Each prompt's continuation, decoded until every row has ended (EOS, `max_new` tokens, or a stop
        sequence), cut before its first stop sequence."""
        decoders = [StreamDecoder(self.sp) for _ in prompts]
        texts = [""] * len(prompts)
        done = [False] * len(prompts)
        for step in self.model.stream(prompts, max_new, temperature=temperature):
            for i, token in enumerate(step):
                if done[i] or token is None or token == self.eot_token_id:
                    done[i] = True
                    continue
                seen = len(texts[i])
                texts[i] += decoders[i].push(token)
                # a stop sequence ends in the new text; it may begin before it
                done[i] = any(stop in texts[i][max(0, seen - len(stop) + 1):] for stop in until)
            if all(done):
                break
        return [_cut(text + decoder.flush(), until) for text, decoder in zip(texts, decoders)]

    def _batched(self, order: list[int], key: Callable[[int], str], run: Callable[[list[int]], list], desc: str,
                 disable_tqdm: bool) -> list:
        """`run` over the requests in `order`, at most `batch_size` consecutive ones of the same `key` at a time
        -> the results in request order."""
        results: list = [None] * len(order)
        bar = tqdm(total=len(order), desc=desc, disable=disable_tqdm or not self.progress)
        batch: list[int] = []
        for i in [*order, None]:
            if batch and (i is None or len(batch) == self.batch_size or key(batch[0]) != key(i)):
                for j, value in zip(batch, run(batch)):
                    results[j] = value
                bar.update(len(batch))
                batch = []
            if i is not None:
                batch.append(i)
        bar.close()
        return results


def _cut(text: str, until: tuple[str, ...]) -> str:
    """`text` up to its first stop sequence."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
