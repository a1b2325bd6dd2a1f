"""The LLM judge against a real ``vllm serve`` OpenAI-compatible server (CPU, one per test session) running a tiny
random Llama built here, and against the same model in an in-process ``vllm.LLM`` (the ``vllm`` backend).

The model (``LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, 2 layers, 2 heads, 1 KV head,
head_dim=64)``, seeded random weights) has a word-level tokenizer with a ChatML template, and two coordinates of its
embeddings and LM head set by hand so that a judge's reply is readable although the weights are random: after an
ordinary token the likely next tokens are the identifiers ``m``/``M`` and the single-token ratings ``[[1]]`` ...
``[[10]]`` (which of them wins still depends on the random weights and the context), and after a rating the end of
turn. So the pairwise protocol finds both identifiers among the top log-probs and the MT-Bench protocol finds a
rating in the reply; the values themselves are random.

Reference for the pairwise value: the same model run by Hugging Face transformers on the same chat-templated prompt.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline_lib.judges import Item, build_judge
from pipeline_lib.judges.llm.client import JudgeRequestError
from tests.integration._servers import REPO, start_vllm_serve, stop, tail

SPECIAL = ["<pad>", "<unk>", "<bos>", "<|im_end|>", "<|im_start|>"]
RATINGS = [f"[[{i}]]" for i in range(1, 11)]
WORDS = ("a the of and to in is it that for on with as was by at be this are from or an not which output model "
         "instruction answer question response better rating user assistant system judge please act impartial "
         "evaluate quality helpful accurate reference turn cat dog sat mat two plus four five").split()
PUNCT = list(".,!?:;()'\"-[]#") + [str(i) for i in range(10)]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
PAIRS = [("Tell me about cats.", "The cat sat on the mat.", "A dog is not a cat."),
         ("What is two plus two?", "It is four.", "It is five, as the answer to the question."),
         ("Write a rating.", "Output (a) is better. [[10]]", "a cat"),
         ("Say it.", "it", "the it")]


def build_judge_model(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_list = SPECIAL + ["m", "M"] + RATINGS + WORDS + PUNCT
    vocab_list += [f"w{i}" for i in range(512 - len(vocab_list))]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<|im_end|>", bos_token="<bos>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"], chat_template=CHATML)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=2, eos_token_id=vocab["<|im_end|>"], tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float().eval()
    rating_ids = [vocab[r] for r in RATINGS]
    with torch.no_grad():
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        head.mul_(4.0)  # spread the random part of the logits, so the winners differ between contexts
        # coordinate 0 marks ordinary tokens, coordinate 1 the ratings; the head turns them into next-token boosts
        emb[:, :2], head[:, :2] = 0.0, 0.0
        emb[:, 0] = 0.5
        emb[rating_ids, 0], emb[rating_ids, 1] = 0.0, 0.5
        head[[vocab["m"], vocab["M"]] + rating_ids, 0] = 1.0
        head[vocab["<|im_end|>"], 1] = 1.0
    model.save_pretrained(out)
    tok.save_pretrained(out)


@pytest.fixture(scope="session")
def judge_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llm-judge-model")
    build_judge_model(out)
    return out


@pytest.fixture(scope="session")
def vllm_server(judge_model, tmp_path_factory):
    """``vllm serve`` on a free loopback port; yields the API root once it answers /health."""
    log = tmp_path_factory.mktemp("vllm-serve") / "serve.log"
    proc, port = start_vllm_serve(judge_model, 512, log)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{tail(log)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve not healthy after 300 s:\n{tail(log)}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


def hf_p_first(model_dir: Path, messages: list[dict]) -> float:
    """P(first better) = p(m) / (p(m) + p(M)) at the first reply position, by transformers on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        lp_tok = model(ids).logits[0, -1].float().log_softmax(-1)
    m, big_m = tok.convert_tokens_to_ids(["m", "M"])
    return 1.0 / (1.0 + math.exp(float(lp_tok[big_m] - lp_tok[m])))


def test_pairwise_through_vllm_serve(vllm_server, judge_model):
    """For each pair: P(a > b) in (0, 1); the same on a second call (temperature 0); P(a > b) + P(b > a) = 1; and
    equal to transformers' p(m) / (p(m) + p(M)) on the same prompt, mapped back when b was shown first."""
    judge = build_judge({"kind": "llm", "backend": "http", "base_url": vllm_server, "model": str(judge_model)})
    assert judge.identity()["model_sha256"]  # a served local directory is identified by its content
    for prompt, a, b in PAIRS:
        p = judge.compare(prompt, a, b)
        assert 0.0 < p < 1.0
        assert judge.compare(prompt, a, b) == p
        assert judge.compare(prompt, b, a) + p == pytest.approx(1.0, abs=1e-12)
        a_first = judge.protocol.a_first(prompt, a, b)
        req = judge.protocol.request(prompt, *((a, b) if a_first else (b, a)))
        ref = hf_p_first(judge_model, req.messages)
        assert p == pytest.approx(ref if a_first else 1.0 - ref, abs=1e-4)
    # a batch of concurrent requests (vLLM batches them) gives the same values as one at a time
    m = judge.rank(PAIRS[0][0], [PAIRS[0][1], PAIRS[0][2], "a cat sat"])
    assert m[0, 1] == pytest.approx(judge.compare(*PAIRS[0]), abs=1e-5)
    assert (m + m.T) == pytest.approx(1.0, abs=1e-12)
    assert judge.no_verdict == 0


def test_swap_consistency_through_vllm_serve(vllm_server, judge_model):
    """Both orders judged: a tie (0.5) where the two orders disagree, else the mean of the two mapped-back values,
    which is the complement of the swapped call."""
    plain = build_judge({"kind": "llm", "base_url": vllm_server, "model": str(judge_model)})
    judge = build_judge({"kind": "llm", "base_url": vllm_server, "model": str(judge_model), "swap_consistency": True})
    for prompt, a, b in PAIRS:
        ab = plain.protocol.request(prompt, a, b)
        ba = plain.protocol.request(prompt, b, a)
        p1, p2 = (_p(plain, ab), 1.0 - _p(plain, ba))  # P(a > b) with a first, with b first
        expected = 0.5 if (p1 - 0.5) * (p2 - 0.5) <= 0 else (p1 + p2) / 2
        p = judge.compare(prompt, a, b)
        assert p == pytest.approx(expected, abs=1e-6)
        assert judge.compare(prompt, b, a) == pytest.approx(1.0 - p, abs=1e-6)


def _p(judge, req) -> float:
    from pipeline_lib.judges.llm.protocols import p_first_better

    return p_first_better(judge.client.chat_many([req])[0].first_token_logprobs)


def test_mt_bench_ratings_through_vllm_serve(vllm_server, judge_model):
    """Single-answer grading with FastChat's templates (turn 1 general, turn 1 math with a reference, turn 2
    writing): every reply holds a rating, each in 1..10, the same on a second call (temperature 0), and each equal
    to the rating in the reply transformers' greedy decoding writes for the same prompt."""
    from tests.conftest import shared_dir

    judge = build_judge({"kind": "llm", "base_url": vllm_server, "model": str(judge_model), "protocol": "mt_bench",
                         "judge_prompts": str(shared_dir() / "data" / "mt_bench" / "judge_prompts.jsonl"),
                         "max_tokens": 16})
    items = [Item("Tell me about cats.", "The cat sat on the mat."),
             Item("What is two plus two?", "five", {"category": "math", "reference": "four"}),
             Item("Now as a poem.", "a cat, a mat", {"category": "writing", "turns": ["Tell me about cats.",
                  "Now as a poem."], "answers": ["The cat sat.", "a cat, a mat"]}),
             Item("Rate me.", "Output (a) is better. Rating: [[10]]")]
    ratings = judge.score(items)
    assert judge.no_verdict == 0
    assert all(r == int(r) and 1 <= r <= 10 for r in ratings)
    assert judge.score(items).tolist() == ratings.tolist()
    for i, item in enumerate(items):
        req = judge.protocol.request(item.prompt, item.response, item.meta, i)
        assert judge.protocol.mt_bench.parse_rating(hf_greedy(judge_model, req.messages, 16)) == ratings[i]


def hf_greedy(model_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_bad_request_from_vllm_serve_is_not_retried(vllm_server, judge_model):
    """A prompt longer than the server's context (512 tokens) is a 400 from vLLM: one attempt, a clear error."""
    judge = build_judge({"kind": "llm", "base_url": vllm_server, "model": str(judge_model), "max_retries": 3})
    with pytest.raises(JudgeRequestError, match="HTTP 400"):
        judge.compare("the cat sat " * 300, "a", "b")
    assert judge.client.stats["attempts"] == 1


@pytest.mark.slow
def test_in_process_vllm_backend_matches_the_server(vllm_server, judge_model, tmp_path):
    """The ``vllm`` backend (an in-process engine, run in a child process so its memory goes when it ends) gives the
    same P(a > b) as the server for every pair, and counts the same tokens as the server reports in ``usage``."""
    http = build_judge({"kind": "llm", "base_url": vllm_server, "model": str(judge_model)})
    expected = [http.compare(*pair) for pair in PAIRS]
    script = (
        "import json, sys\n"
        "from pipeline_lib.judges import build_judge\n"
        "j = build_judge({'kind': 'llm', 'backend': 'vllm', 'model': sys.argv[1],\n"
        "                 'engine_kwargs': {'max_model_len': 512, 'dtype': 'float32'}})\n"
        "pairs = json.loads(sys.argv[2])\n"
        "print('RESULT', json.dumps(j.compare_many([tuple(p) for p in pairs]).tolist()))\n"
        "print('STATS', json.dumps(j.client.stats))\n")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
    out = subprocess.run([sys.executable, "-c", script, str(judge_model), json.dumps(PAIRS)], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))[7:])
    assert got == pytest.approx(expected, abs=1e-5)
    stats = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("STATS"))[6:])
    tokens = ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    assert {k: stats[k] for k in tokens} == {k: http.client.stats[k] for k in tokens}
    assert stats["completion_tokens"] == len(PAIRS) and http.client.stats["replies_without_usage"] == 0
