"""server.py: the real `openai` client talks to our server, on 127.0.0.1, with the real demo model.

The server runs in a thread of this process (uvicorn on an ephemeral port) over SmolLM2-135M in
float32. What it answers is held to what the same checkpoint gives *alone* (a second engine, one
prompt at a time, `LLaMa.decode`), whose tokens Hugging Face's generate matches (test_fidelity.py).
Greedy ties: the batch a row runs in may change float32 sums in the last bits; where a server
answer and the lone run part, the lone run's two best logits must have been within TIE_MARGIN
there (float noise), never further apart.
"""

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import openai
import pytest
import torch
import uvicorn

from inference import LLaMa
from sampling import SamplingParams
from server import Server

MODEL = "smollm2-test"
API_KEY = "test-key-123"
MAX_SEQ_LEN = 512
TIE_MARGIN = 1e-3  # logits; float32 noise between batch shapes is ~1e-5
GREEDY = SamplingParams(temperature=0)
STARTUP_SECONDS = 60  # bounds, not timings: how long a test waits before it calls a hang a failure
FREED_SECONDS = 30
CONCURRENT_TOKENS = 32  # per client of the 8 concurrent ones
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What is 7 times 8?", "Say hello in Spanish.",
             "What do bees make?", "How many legs does a spider have?", "What is the opposite of hot?",
             "Write a haiku about rain."]


@pytest.fixture(scope="module")
def served(demo_ckpt):
    """The server on an ephemeral port, stopped at the end of the module."""
    llama = LLaMa.build(demo_ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=8, device="cpu", dtype="float32",
                        progress=False)
    server = Server(llama, MODEL, api_key=API_KEY, max_queue=16)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_SECONDS
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    yield SimpleNamespace(server=server, client=client, url=f"http://127.0.0.1:{port}", port=port)
    uv.should_exit = True
    thread.join(timeout=30)
    sock.close()


@pytest.fixture(scope="module")
def alone(demo_ckpt):
    """A second engine on the same checkpoint, for what each prompt gives alone."""
    return LLaMa.build(demo_ckpt, max_seq_len=MAX_SEQ_LEN, max_batch_size=1, device="cpu", dtype="float32",
                       progress=False)


def greedy_alone(llama, prompt_tokens: list[int], max_gen_len: int, stop_tokens) -> tuple[list[int], list[float]]:
    """The greedy tokens of one prompt alone, and at each step the gap between the two best logits."""
    tokens, margins = [], []
    for step in llama.decode([prompt_tokens], max_gen_len, GREEDY):
        best = step.logits[0].topk(2).values
        margins.append(float(best[0] - best[1]))
        token = int(step.tokens[0])
        if token in stop_tokens:
            break
        tokens.append(token)
        if len(tokens) == max_gen_len:
            break
    return tokens, margins


def assert_same_or_tie(llama, got: list[str], tokens: list[int], margins: list[float], what: str) -> None:
    """`got` (the server's token strings) equals the lone run's tokens, or parts from them only where
    the lone run had a tie within float noise."""
    expected = [llama.tokenizer.decode([t]) for t in tokens]
    for i, (a, b) in enumerate(zip(got, expected)):
        if a != b:
            assert margins[i] < TIE_MARGIN, f"{what}: token {i} is {a!r}, alone {b!r} (logit gap {margins[i]:.2e})"
            return
    assert len(got) == len(expected), f"{what}: {len(got)} tokens, alone {len(expected)}"


def chat_prompt(llama, question: str) -> list[int]:
    return llama.chat_format.encode_dialog_prompt([{"role": "user", "content": question}])


def post(served, path: str, body, key=API_KEY) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of a raw POST: for what the openai client would not send."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(served.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


# --------------------------------------------------------------------------------------------
# The API, through the official client
# --------------------------------------------------------------------------------------------


def test_models_and_health(served):
    assert [m.id for m in served.client.models.list().data] == [MODEL]
    with urllib.request.urlopen(served.url + "/health", timeout=30) as response:
        assert json.loads(response.read()) == {"status": "ok"}


def test_a_completion_is_the_prompts_greedy_text_alone(served, alone):
    prompt = "The capital of France is"
    answer = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, logprobs=0)
    tokens, margins = greedy_alone(alone, alone.encode_prompt(prompt, "prompt"), 20, alone.tokenizer.stop_tokens)
    choice = answer.choices[0]
    assert_same_or_tie(alone, choice.logprobs.tokens, tokens, margins, prompt)
    assert choice.text == "".join(choice.logprobs.tokens)
    assert choice.finish_reason == ("length" if len(tokens) == 20 else "stop")
    assert answer.usage.prompt_tokens == len(alone.encode_prompt(prompt, "prompt"))
    assert answer.usage.completion_tokens == len(choice.logprobs.tokens)
    logprobs = torch.tensor(choice.logprobs.token_logprobs)
    assert bool((logprobs <= 0).all())


def test_a_chat_completion_is_the_dialogs_greedy_answer_alone(served, alone):
    question = "What is the capital of France?"
    answer = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}],
                                                   max_tokens=40, temperature=0, logprobs=True)
    tokens, margins = greedy_alone(alone, chat_prompt(alone, question), 40, alone.chat_format.stop_tokens)
    got = [entry.token for entry in answer.choices[0].logprobs.content]
    assert_same_or_tie(alone, got, tokens, margins, question)
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == "".join(got)
    assert "Paris" in answer.choices[0].message.content


def test_a_stream_joins_into_the_whole_answer_and_ends_with_usage(served):
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    chunks = list(served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 3  # it came in pieces
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) == {None}
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_ends_the_text_right_before_it(served):
    free = served.client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0)
    assert " 6," in free.choices[0].text
    stopped = served.client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0,
                                               stop=[" 6,"])
    assert stopped.choices[0].text == free.choices[0].text.split(" 6,")[0]
    assert stopped.choices[0].finish_reason == "stop"


def test_a_seed_makes_sampling_reproducible(served):
    ask = dict(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    first = served.client.completions.create(**ask).choices[0].text
    assert served.client.completions.create(**ask).choices[0].text == first
    others = {served.client.completions.create(**{**ask, "seed": s}).choices[0].text for s in (8, 9)}
    assert len(others | {first}) > 1  # and it does sample


def test_eight_concurrent_streaming_clients_get_what_each_prompt_gives_alone(served, alone):
    def ask(question: str) -> tuple[list[str], str]:
        stream = served.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=CONCURRENT_TOKENS, temperature=0,
            stream=True, logprobs=True)
        tokens, text, utf8 = [], "", b""
        for chunk in stream:
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            for entry in choice.logprobs.content if choice.logprobs else []:
                tokens.append(entry.token)
                utf8 += bytes(entry.bytes)  # a token may hold only part of a character (an emoji)
        assert text == utf8.decode("utf-8", errors="replace")
        return tokens, text

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS))
    for question, (tokens, text) in zip(QUESTIONS, answers):
        expected, margins = greedy_alone(alone, chat_prompt(alone, question), CONCURRENT_TOKENS,
                                         alone.chat_format.stop_tokens)
        assert_same_or_tie(alone, tokens, expected, margins, question)


def test_a_list_of_prompts_gets_one_choice_each_in_order(served, alone):
    prompts = ["The capital of Italy is", "Water is made of", "The first planet from the sun is"]
    answer = served.client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for prompt, choice in zip(prompts, answer.choices):
        single = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert choice.text == single.choices[0].text


# --------------------------------------------------------------------------------------------
# Limits: the queue, a client that leaves, a request that fails
# --------------------------------------------------------------------------------------------


def wait_until_idle(server) -> None:
    deadline = time.monotonic() + FREED_SECONDS
    while server.engine.in_flight or server.engine.batcher.running:
        assert time.monotonic() < deadline, "a request was not freed"
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_row(served):
    engine = served.server.engine
    gate = threading.Event()

    def hold(module, inputs, output):
        """The engine's first step admits the request and decodes once (2 tokens), then reports them;
        at its next pass it waits until the test says go: the request cannot end on its own meanwhile."""
        running = engine.batcher.running
        if running and running[0].sampled >= 2:
            gate.wait(FREED_SECONDS)

    handle = served.server.llama.model.output.register_forward_hook(hold)
    try:
        stream = served.client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=400,
                                                  temperature=0, stream=True)
        next(iter(stream))  # the first piece: the request is running, and cannot end while the gate is shut
        (request,) = engine.reporters
        stream.close()
        gate.set()
        wait_until_idle(served.server)
    finally:
        handle.remove()
        gate.set()
    assert request.cancelled and request.done
    assert len(request.row.tokens) < 400  # freed long before its max_tokens
    answer = served.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    assert answer.choices[0].finish_reason == "length"


def test_beyond_the_queue_a_request_gets_429_with_retry_after(served):
    engine = served.server.engine
    capacity = engine.capacity
    engine.capacity = engine.in_flight  # as if every row and queue place were taken
    try:
        with pytest.raises(openai.RateLimitError) as caught:
            served.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    finally:
        engine.capacity = capacity
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "1"
    assert caught.value.body["code"] == "rate_limit_exceeded"


def test_a_request_that_turns_nan_ends_with_an_error_event_and_the_server_goes_on(served):
    model = served.server.llama.model
    handle = model.output.register_forward_hook(lambda module, inputs, output: output.fill_(float("nan")))
    try:
        with pytest.raises(openai.APIError, match="NaN/inf logits"):
            for _ in served.client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, stream=True):
                pass
        status, body, _ = post(served, "/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 5})
        assert status == 500 and "NaN/inf logits" in body["error"]["message"] and "Traceback" not in str(body)
    finally:
        handle.remove()
    wait_until_idle(served.server)
    assert served.client.completions.create(model=MODEL, prompt="Hi", max_tokens=3).choices[0].text


# --------------------------------------------------------------------------------------------
# Bad input: a 4xx naming the field, in OpenAI's shape; the server keeps serving
# --------------------------------------------------------------------------------------------

COMPLETION = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    (b"[1, 2]", 400, None, "must be a JSON object"),
    ({**COMPLETION, "max_tokens": -3}, 400, "max_tokens", "from 1 up"),
    ({**COMPLETION, "max_tokens": "ten"}, 400, "max_tokens", "expected an integer"),
    ({**COMPLETION, "temperature": "hot"}, 400, "temperature", "expected a number"),
    ({**COMPLETION, "top_p": 0}, 400, "top_p", "(0.0, 1.0]"),
    ({**COMPLETION, "top_p": 1.5}, 400, "top_p", "(0.0, 1.0]"),
    ({**COMPLETION, "stream": "yes"}, 400, "stream", "expected a boolean"),
    ({**COMPLETION, "stop": 5}, 400, "stop", "string"),
    ({**COMPLETION, "n": 2}, 400, "n", "only n=1"),
    ({**COMPLETION, "prompt": []}, 400, "prompt", "expected a string"),
    ({**COMPLETION, "prompt": "word " * MAX_SEQ_LEN}, 400, "prompt", "no room to generate"),
    ({**COMPLETION, "prompt": [1, 2, 10**9]}, 400, "prompt", "not in the vocabulary"),
    ({**COMPLETION, "model": "gpt-4"}, 404, "model", "does not exist"),
])
def test_bad_completion_requests_get_a_4xx_naming_the_field(served, body, status, param, words):
    got, answer, _ = post(served, "/v1/completions", body)
    assert got == status
    assert answer["error"]["param"] == param
    assert words in answer["error"]["message"]
    assert answer["error"]["type"] in ("invalid_request_error", "not_found_error")


@pytest.mark.parametrize("messages, param", [
    ("hello", "messages"),
    ([{"role": "robot", "content": "hi"}], "messages[0].role"),
    ([{"role": "user", "content": 5}], "messages[0].content"),
    ([{"role": "assistant", "content": "hi"}], "messages"),  # a dialog ends with the user
])
def test_bad_chat_messages_get_a_400_naming_the_message(served, messages, param):
    got, answer, _ = post(served, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 4})
    assert got == 400 and answer["error"]["param"] == param


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_a_missing_or_wrong_api_key_gets_401(served, key):
    got, answer, _ = post(served, "/v1/completions", COMPLETION, key=key)
    assert got == 401 and answer["error"]["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=key or "none", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_after_bad_requests_the_server_still_serves(served):
    assert served.client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0).choices[0].text
