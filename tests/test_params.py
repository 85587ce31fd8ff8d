import json

import pytest

from jaxbench.params import PRESETS, Params, ParamsError, params_from_text, resolve_params


def test_presets_have_the_spec_shapes():
    mainnet = PRESETS["mainnet"]
    assert mainnet.hidden_dim == 49152
    assert round(mainnet.n_params / 1e9, 1) == 17.8  # "~17.7 B" counts the embedding table too
    assert PRESETS["bench"].hidden_dim == 7168
    assert round(PRESETS["bench"].n_params / 1e9, 2) == 1.43
    assert PRESETS["testnet"].seq_len == 128
    assert Params() == Params(dim=2048, n_layers=16, n_heads=16, n_kv_heads=16, vocab_size=8192)


def test_flops_per_nonce_match_the_floor_counts():
    # docs/benchmarks.md, "Reference points": 1.81 TFLOP (bench) and 8.96 TFLOP (mainnet) per nonce.
    assert round(PRESETS["bench"].flops_per_nonce() / 1e12, 2) == 1.81
    assert round(PRESETS["mainnet"].flops_per_nonce() / 1e12, 2) == 8.96


def test_weight_bytes_exclude_the_unused_embedding_table():
    p = PRESETS["tiny"]
    assert p.weight_bytes(2) == 2 * (p.n_params - p.vocab_size * p.dim)


@pytest.mark.parametrize(
    "fields, bad_field",
    [
        ({"bogus": 1}, "bogus"),
        ({"dim": "64"}, "dim"),
        ({"dim": 64.0}, "dim"),
        ({"dim": True}, "dim"),
        ({"dim": 0}, "dim"),
        ({"n_layers": -1}, "n_layers"),
        ({"seq_len": 0}, "seq_len"),
        ({"vocab_size": None}, "vocab_size"),
        ({"norm_eps": 0}, "norm_eps"),
        ({"rope_theta": float("inf")}, "rope_theta"),
        ({"ffn_dim_multiplier": "1.3"}, "ffn_dim_multiplier"),
        ({"use_scaled_rope": 1}, "use_scaled_rope"),
        ({"dim": 65, "n_heads": 4}, "dim"),
        ({"dim": 64, "n_heads": 4, "n_kv_heads": 3}, "n_kv_heads"),
        ({"dim": 60, "n_heads": 4, "n_kv_heads": 4}, "n_heads"),  # head_dim 15 is odd
        ({"n_layers": 1_000_000}, "n_layers"),
        ({"seq_len": 1_000_000_000}, "seq_len"),
        ({"dim": 10**9}, "dim"),
        ({"vocab_size": 2**40}, "vocab_size"),
        ({"ffn_dim_multiplier": 1e300}, "ffn_dim_multiplier"),
        ({"dim": 65536, "n_heads": 64, "ffn_dim_multiplier": 2.0}, "ffn_dim_multiplier"),  # w1 over 2**31
        ({"dim": 4096, "n_heads": 64, "vocab_size": 1 << 20}, "vocab_size"),  # the head over 2**31
        ({"dim": 16384, "n_heads": 128, "n_kv_heads": 128, "n_layers": 200, "ffn_dim_multiplier": 1.0,
          "multiple_of": 1024}, "n_layers"),  # 48 G parameters: a pool over 2**31 values
    ],
)
def test_bad_fields_are_named(fields, bad_field):
    with pytest.raises(ParamsError) as err:
        Params.from_dict(fields)
    assert err.value.field == bad_field
    assert bad_field in str(err.value)


def test_the_command_line_form_takes_presets_json_and_files(tmp_path):
    assert params_from_text("tiny") is PRESETS["tiny"]
    assert params_from_text('{"dim": 64, "n_heads": 4, "n_kv_heads": 4}').dim == 64
    f = tmp_path / "p.json"
    f.write_text(json.dumps(PRESETS["tiny"].to_dict()))
    assert params_from_text(f"@{f}") == PRESETS["tiny"]
    with pytest.raises(ParamsError, match="unknown preset"):
        params_from_text("huge")
    with pytest.raises(ParamsError, match="invalid JSON"):
        params_from_text("{nope")
    with pytest.raises(ParamsError, match="invalid JSON"):
        params_from_text("{" + "[" * 100_000)
    with pytest.raises(ParamsError, match="cannot read"):
        params_from_text(f"@{tmp_path / 'missing.json'}")
    with pytest.raises(ParamsError, match="invalid JSON"):  # an integer too long to convert
        params_from_text('{"dim": ' + "9" * 5000 + "}")
    with pytest.raises(ParamsError, match="not a regular file"):
        params_from_text(f"@{tmp_path}")


def test_a_params_file_is_read_up_to_the_input_bound(tmp_path, monkeypatch):
    from jaxbench import params as params_module

    f = tmp_path / "p.json"
    f.write_text(json.dumps(PRESETS["tiny"].to_dict()))
    monkeypatch.setattr(params_module, "MAX_INPUT_FILE_BYTES", f.stat().st_size)
    assert params_from_text(f"@{f}") == PRESETS["tiny"]
    monkeypatch.setattr(params_module, "MAX_INPUT_FILE_BYTES", f.stat().st_size - 1)
    with pytest.raises(ParamsError, match="larger than") as err:
        params_from_text(f"@{f}")
    assert err.value.field == "params"


def test_what_arrives_over_the_network_never_names_a_file_or_json_text(tmp_path):
    f = tmp_path / "p.json"
    f.write_text(json.dumps(PRESETS["tiny"].to_dict()))
    assert resolve_params("tiny") is PRESETS["tiny"]
    assert resolve_params(PRESETS["tiny"].to_dict()) == PRESETS["tiny"]
    for text in (f"@{f}", "@/dev/zero", json.dumps(PRESETS["tiny"].to_dict())):
        with pytest.raises(ParamsError, match="unknown preset"):
            resolve_params(text)
