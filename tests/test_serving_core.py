import pytest

from haps_ray.engine.generator import Generation
from haps_ray.serving import ApiError, chat_completion, models_list, parse_chat_request

MODELS = ["haps", "tiny-llama"]


def ok(**over):
    body = {"model": "haps", "messages": [{"role": "user", "content": "Who?"}]}
    body.update(over)
    return body


def test_valid_request_defaults_and_question():
    req = parse_chat_request(ok(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}, {"role": "user", "content": "q"}],
                                stop="\n"), MODELS, 256)
    assert req.question == "q" and req.temperature == 0.0 and req.top_p == 1.0
    assert req.stop == ["\n"] and req.max_tokens is None


@pytest.mark.parametrize("body,status,param", [
    ([1], 400, None),
    ({"messages": []}, 400, "model"),
    (ok(model="nope"), 404, "model"),
    (ok(stream=True), 400, "stream"),
    (ok(messages=[]), 400, "messages"),
    (ok(messages="hi"), 400, "messages"),
    (ok(messages=[{"role": "robot", "content": "x"}]), 400, "messages[0].role"),
    (ok(messages=[{"role": "user", "content": 3}]), 400, "messages[0].content"),
    (ok(messages=[{"role": "user", "content": "  "}]), 400, "messages"),
    (ok(temperature=3), 400, "temperature"),
    (ok(temperature="hot"), 400, "temperature"),
    (ok(top_p=0), 400, "top_p"),
    (ok(max_tokens=0), 400, "max_tokens"),
    (ok(max_tokens=257), 400, "max_tokens"),
    (ok(stop=[""]), 400, "stop"),
    (ok(seed=1.5), 400, "seed"),
])
def test_bad_requests_name_the_field(body, status, param):
    with pytest.raises(ApiError) as info:
        parse_chat_request(body, MODELS, 256)
    err = info.value
    assert err.status == status and err.param == param
    assert set(err.body()["error"]) == {"message", "type", "param", "code"}


def test_chat_completion_schema():
    gen = Generation(text="Paris", token_ids=[1, 2], logprobs=[-0.1, -0.2], n_input_tokens=7,
                     n_output_tokens=2, finish_reason="stop")
    out = chat_completion("tiny-llama", gen, extra={"haps": {"assignment": {"teacher": 0}}})
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "Paris"}
    assert out["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert out["haps"]["assignment"] == {"teacher": 0}
    assert [m["id"] for m in models_list(MODELS)["data"]] == MODELS
