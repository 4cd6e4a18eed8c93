"""lm-evaluation-harness over hubquant's runners: any lm-eval task against any variant or the reference.

:class:`RunnerLM` is an lm-eval model (``lm_eval.api.model.TemplateLM``) whose scores come from a
:class:`hubquant.exporters.base.Runner` — GGUF, ONNX, OpenVINO, MLX or the PyTorch reference alike.
Text is tokenized with the *source's* Hugging Face tokenizer, by lm-eval's own pairing rules
(``TemplateLM._encode_pair``: trailing context spaces move to the continuation; an empty context
is the BOS/EOS token) and with lm-eval's ``hf`` model's special-token handling, so the reference
gives the loglikelihoods that ``lm_eval --model hf`` gives (a test holds them within 1e-4).

- ``loglikelihood``: one forward pass over ``(context + continuation)[:-1]`` (left-truncated to
  ``max_length``), the continuation's log-probabilities summed; *greedy* when every continuation
  token is the argmax. Requests with the same input (one-token answers to one question) share it.
- ``loglikelihood_rolling``: lm-eval's disjoint rolling windows of ``max_length`` tokens.
- ``generate_until``: greedy decoding through the runner's ``prefill``/``step``, stopping at the
  task's ``until`` strings or the end-of-text token, at most ``max_gen_toks`` tokens. Sampling
  settings are not honoured (a warning says so): every runtime decodes greedily, as a comparison needs.

This module imports lm-eval at the top: only the task worker (a child process) imports it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM

from hubquant.stats import log_softmax

if TYPE_CHECKING:
    from hubquant.exporters.base import Runner

log = logging.getLogger(__name__)


def continuation_score(logits: np.ndarray, continuation: Sequence[int]) -> tuple[float, bool]:
    """Summed log-probability of ``continuation`` from the last ``len(continuation)`` rows of logits
    (row i predicts the token after position i), and whether each token was the argmax."""
    rows = logits[-len(continuation) :]
    tokens = np.asarray(continuation)
    logprobs = log_softmax(rows)[np.arange(len(tokens)), tokens]
    return float(logprobs.sum()), bool((rows.argmax(axis=-1) == tokens).all())


class RunnerLM(TemplateLM):
    """An lm-eval model over a hubquant runner and the source's tokenizer."""

    def __init__(
        self, runner: Runner, tokenizer: Any, *, vocab_size: int | None, max_length: int, max_gen_toks: int = 256
    ) -> None:
        super().__init__()
        self.runner, self.tokenizer = runner, tokenizer
        self.vocab_size, self._max_length, self._max_gen_toks = vocab_size, max_length, max_gen_toks
        #: Forward passes and tokens they processed (the time per example is reported from these).
        self.forward_passes = 0
        self.forward_tokens = 0
        self._prefix_text = tokenizer.decode(self.prefix_token_id)

    # -- what TemplateLM asks for ------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        """As lm-eval's ``hf`` model: the tokenizer's own special tokens unless told, none when the
        text already starts with the BOS text."""
        special: dict[str, bool] = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        if add_special_tokens is None and string.startswith(self._prefix_text):
            special["add_special_tokens"] = False
        encoding = list(self.tokenizer.encode(string, **special))
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- scoring -----------------------------------------------------------------------------------
    def _logits(self, ids: list[int]) -> np.ndarray:
        self.forward_passes += 1
        self.forward_tokens += len(ids)
        logits = self.runner.logits(ids)
        return logits[:, : self.vocab_size]  # runtimes may pad the vocabulary

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation or len(continuation) > self.max_length:
                raise ValueError("lm-eval asked for an empty context or continuation, or one longer than max_length")
            ids = (context + continuation)[-(self.max_length + 1) :][:-1]
            groups.setdefault(tuple(ids), []).append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for ids, members in groups.items():
            logits = self._logits(list(ids))
            for index in members:
                strings, _, continuation = requests[index]
                results[index] = continuation_score(logits, continuation)
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, results[index])
        return [r for r in results if r is not None]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        totals = []
        for (string,) in [request.args for request in requests]:
            windows = [
                lm_utils.make_disjoint_window(window)
                for window in lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            scores = self._loglikelihood_tokens([(None, context, cont) for context, cont in windows])
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        answers = []
        for context, settings in [request.args for request in requests]:
            settings = dict(settings or {})
            if settings.get("do_sample") or settings.get("temperature", 0.0) > 0:
                log.warning("lm-eval asked for sampling; hubquant decodes greedily in every runtime")
            until = settings.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            eot = self.tok_decode([self.eot_token_id])
            stops = [*until, eot] if eot not in until else until
            new_tokens = int(settings.get("max_gen_toks", self._max_gen_toks))
            ids = self.tok_encode(context, left_truncate_len=max(1, self.max_length - new_tokens))
            text = self._greedy(ids, new_tokens, stops)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", (context, settings), text)
            answers.append(text)
        return answers

    def _greedy(self, ids: list[int], new_tokens: int, stops: list[str]) -> str:
        """Greedy tokens after ``ids`` until a stop string appears, the end-of-text token, or the limit."""
        generated: list[int] = []
        self.forward_passes += 1
        self.forward_tokens += len(ids)
        token = self.runner.prefill(ids, room=new_tokens)
        while len(generated) < new_tokens and token != self.eot_token_id:
            generated.append(token)
            text = self.tok_decode(generated)
            if any(stop and stop in text for stop in stops):
                break
            if len(generated) < new_tokens:
                self.forward_tokens += 1
                token = self.runner.step(token)
        return self.tok_decode(generated)
