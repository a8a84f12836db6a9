"""The explainer LMs of `saelab explain`: a local HF causal LM, or an OpenAI-compatible endpoint.

Both answer the two questions saelab.explain asks: `complete` (a short greedy answer to a chat)
and `detect` (a margin per text: how much it matches an explanation). Two ways to detect:

- yes_no: "does this text contain <explanation>?", margin log P(Yes) − log P(No) of the
  answer's first token. An endpoint reads them from the `top_logprobs` of a one-token chat
  completion, or, when it returns none, from its answer's text (+1 Yes, −1 No, 0 neither), and
  then says the margins are not graded.
- likelihood (local models; the default there): the largest gain, over the tokens of the text,
  of log P(token) when the LM reads "A text containing <explanation>. Text:" before it rather
  than "Text:". A small model reads a description into its predictions far better than it
  answers questions about one: on texts with and without the word "ocean", SmolLM2-135M's
  Yes/No margins for 'the word "ocean"' sat within 0.3 nats of each other on every text and
  separated them below chance (balanced accuracy 0.33), while the likelihood gain separated
  them (0.83), and a wrong explanation ("kitchen tools") stayed at 0.33.

An endpoint's key is read from the environment variable the user names and lives only in the
request headers: it is never part of `name` (what the run file records) nor of any message.
"""

from __future__ import annotations

import json
import math
import os
import urllib.error
import urllib.request
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from saelab.errors import UserError

Chat = list[dict[str, str]]
"""OpenAI-style messages: [{"role": "system"|"user"|"assistant", "content": str}]."""

YES, NO = ("Yes", " Yes", "yes", " yes"), ("No", " No", "no", " no")


class Explainer(Protocol):
    name: str
    """What the run file records as the explainer (never a secret)."""

    def complete(self, chat: Chat, max_new_tokens: int) -> str: ...

    def detect(self, explanation: str, texts: list[str]) -> tuple[np.ndarray, bool]:
        """One margin per text, higher meaning "matches the explanation" more, and whether
        the margins are graded (False: ±1/0 read from answer texts)."""
        ...


def detect_chat(explanation: str, text: str) -> Chat:
    return [
        {
            "role": "user",
            "content": f"Text: {text.strip()}\n\nDoes this text contain {explanation}? "
            "Answer Yes or No.",
        },
    ]


def likelihood_prefixes(explanation: str) -> tuple[str, str]:
    """(with the explanation, without): the texts a likelihood explainer reads before a text."""
    return f"A text containing {explanation}. Text:", "Text:"


def is_endpoint(name: str) -> bool:
    return name.startswith(("http://", "https://"))


# ---------------------------------------------------------------------------------------
# A local HF causal LM


class LocalExplainer:
    """An HF causal LM loaded through saelab.models (so the embedded default works offline)."""

    def __init__(
        self, name: str, device: str = "auto", batch_size: int = 8, mode: str = "likelihood"
    ) -> None:
        import torch

        from saelab.models import load_model, resolve_device

        self.device = resolve_device(device)
        bridge = load_model(name, device=str(self.device))
        hf = getattr(bridge, "original_model", None)
        if not (hasattr(hf, "generate") and hasattr(hf, "get_output_embeddings")):
            raise UserError(
                f"explainer '{name}' is not an HF causal LM that can generate text; pass an HF "
                "model name or folder, or the embedded default smollm2-135m"
            )
        self.name, self.tok = name, bridge.tokenizer
        self.model: Any = hf
        self.batch_size, self.mode = batch_size, mode
        self._torch = torch
        self.yes = sorted({self.tok.encode(w, add_special_tokens=False)[0] for w in YES})
        self.no = sorted({self.tok.encode(w, add_special_tokens=False)[0] for w in NO})

    def _ids(self, chat: Chat) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
            return list(self.tok(text, add_special_tokens=False)["input_ids"])
        text = "\n\n".join(m["content"] for m in chat) + "\n\nAnswer:"
        return list(self.tok(text)["input_ids"])

    def complete(self, chat: Chat, max_new_tokens: int) -> str:
        torch = self._torch
        ids = torch.tensor([self._ids(chat)], device=self.device)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                do_sample=False, pad_token_id=pad,
            )  # fmt: skip
        return self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

    def _batches(self, seqs: list[list[int]]) -> Any:
        """(ids, lengths, last hidden states) per batch of right-padded sequences: positions
        stay 0..n-1 in every row, and causal attention keeps a row's pads out of its states."""
        torch = self._torch
        for a in range(0, len(seqs), self.batch_size):
            part = seqs[a : a + self.batch_size]
            ids = torch.zeros(len(part), max(map(len, part)), dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, q in enumerate(part):
                ids[r, : len(q)], mask[r, : len(q)] = torch.tensor(q), 1
            with torch.no_grad():
                h = self.model.base_model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).last_hidden_state
            yield ids.to(self.device), [len(q) for q in part], h

    def _log_probs(self, h: Any) -> Any:
        return self.model.get_output_embeddings()(h).float().log_softmax(-1)

    def yes_no(self, chats: list[Chat]) -> np.ndarray:
        """log P(Yes) − log P(No) of the first token of the answer to each chat."""
        torch, out = self._torch, []
        for _, lens, h in self._batches([self._ids(c) for c in chats]):
            with torch.no_grad():
                lp = self._log_probs(h[torch.arange(len(lens)), torch.tensor(lens) - 1])
            out.append((lp[:, self.yes].logsumexp(-1) - lp[:, self.no].logsumexp(-1)).cpu())
        return torch.cat(out).numpy() if out else np.zeros(0)

    def token_log_probs(self, prefix: str, texts: list[str]) -> list[np.ndarray]:
        """log P(token | prefix, the text before it) of each token of each text."""
        torch = self._torch
        head = self.tok(prefix)["input_ids"]
        bodies = [self.tok(t, add_special_tokens=False)["input_ids"] for t in texts]
        out = []
        for ids, lens, h in self._batches([head + b for b in bodies]):
            with torch.no_grad():
                lp = self._log_probs(h[:, len(head) - 1 : -1])
                lp = lp.gather(-1, ids[:, len(head) :, None])[..., 0].cpu().numpy()
            out += [lp[r, : n - len(head)] for r, n in enumerate(lens)]
        return out

    def detect(self, explanation: str, texts: list[str]) -> tuple[np.ndarray, bool]:
        if self.mode == "yes_no":
            return self.yes_no([detect_chat(explanation, t) for t in texts]), True
        given, plain = likelihood_prefixes(explanation)
        with_, without = self.token_log_probs(given, texts), self.token_log_probs(plain, texts)
        # The largest gain of one token: a latent fires on a token, and the first token of a
        # text mostly measures how well it follows the prefix, so it is left out.
        gain = [(w - o)[1:].max() if w.size > 1 else 0.0 for w, o in zip(with_, without)]
        return np.array(gain, np.float64), True


# ---------------------------------------------------------------------------------------
# An OpenAI-compatible endpoint


def _public_url(url: str) -> str:
    """The URL without credentials, query or fragment: what the run file may record."""
    p = urlsplit(url)
    host = p.hostname or ""
    netloc = f"{host}:{p.port}" if p.port else host
    return urlunsplit((p.scheme, netloc, p.path.rstrip("/"), "", ""))


def _logsumexp(xs: list[float]) -> float:
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def _margin(choice: dict[str, Any]) -> float | None:
    """log P(Yes) − log P(No) from a choice's first-token top_logprobs; None when it has
    neither word. A word missing from the top list gets the list's lowest log-prob (a bound)."""
    try:
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        pairs = [(str(t["token"]).strip().lower(), float(t["logprob"])) for t in top]
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    yes = [lp for t, lp in pairs if t == "yes"]
    no = [lp for t, lp in pairs if t == "no"]
    if not (yes or no):
        return None
    floor = [min(lp for _, lp in pairs)]
    return _logsumexp(yes or floor) - _logsumexp(no or floor)


def _text_margin(text: str) -> float:
    word = text.strip().lower()
    return 1.0 if word.startswith("yes") else -1.0 if word.startswith("no") else 0.0


class HTTPExplainer:
    """`chat/completions` of an OpenAI-compatible server (vLLM, llama.cpp, OpenAI, …)."""

    def __init__(
        self, url: str, model: str = "", key_env: str = "", seed: int = 0, timeout: float = 120
    ) -> None:
        key = ""
        if key_env:
            key = os.environ.get(key_env, "")
            if not key:
                raise UserError(
                    f"environment variable {key_env} is not set; export the API key in it, or "
                    "pass --api_key_env '' for an endpoint that needs none"
                )
        self.url = url.rstrip("/") + "/chat/completions"
        self.name = _public_url(url) + (f"#{model}" if model else "")
        self.model, self.seed, self.timeout, self._key_env = model, seed, timeout, key_env
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        body = {**body, "temperature": 0, "seed": self.seed}
        if self.model:
            body["model"] = self.model
        req = urllib.request.Request(self.url, json.dumps(body).encode(), self._headers)
        where = f"explainer endpoint {self.name}"
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                data = json.loads(r.read().decode())
        except urllib.error.HTTPError as e:
            key = f" and the key in ${self._key_env}" if self._key_env else ""
            raise UserError(
                f"{where} answered HTTP {e.code} ({e.reason}); check the URL, --api_model{key}"
            ) from None
        except OSError as e:  # URLError, timeouts and refused connections alike
            why = getattr(e, "reason", None) or e
            raise UserError(
                f"{where} cannot be reached ({why}); check the URL and that the server runs"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{where} did not answer JSON; is it OpenAI-compatible?") from None
        if not (isinstance(data, dict) and data.get("choices")):
            raise UserError(f"{where} answered without choices; is it OpenAI-compatible?")
        return data["choices"][0]

    def complete(self, chat: Chat, max_new_tokens: int) -> str:
        msg = self._post({"messages": chat, "max_tokens": max_new_tokens}).get("message") or {}
        return str(msg.get("content") or "")

    def detect(self, explanation: str, texts: list[str]) -> tuple[np.ndarray, bool]:
        margins, graded = [], True
        for text in texts:
            chat = detect_chat(explanation, text)
            body = {"messages": chat, "max_tokens": 1, "logprobs": True, "top_logprobs": 20}
            choice = self._post(body)
            m = _margin(choice)
            if m is None:
                graded = False
                m = _text_margin(str((choice.get("message") or {}).get("content") or ""))
            margins.append(m)
        return np.array(margins, np.float64), graded


def make_explainer(
    name: str, *, api_model: str = "", api_key_env: str = "", seed: int = 0, device: str = "auto",
    batch_size: int = 8, detection: str = "auto",
) -> Explainer:  # fmt: skip
    """The explainer a name asks for: an http(s) URL is an endpoint, anything else a model."""
    if is_endpoint(name):
        if detection == "likelihood":
            raise UserError(
                "an endpoint's chat API gives no log-probs of a given text, so it cannot score "
                "by likelihood; use --detection yes_no (or auto)"
            )
        return HTTPExplainer(name, api_model, api_key_env, seed)
    mode = "likelihood" if detection == "auto" else detection
    return LocalExplainer(name, device, batch_size, mode)
