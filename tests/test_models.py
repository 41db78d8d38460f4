"""Back-ends against the models' own forward passes, on tiny checkpoints in the official formats."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ctrace.errors import CtraceInputError
from ctrace.models import GeneformerBackend, ScGPTBackend, load_backend
from ctrace.models.base import Edits
from ctrace.vocab import load_geneformer_dictionaries, load_scgpt_vocab
from model_fixtures import (
    have_real_geneformer_dicts,
    have_real_scgpt_vocab,
    random_cells,
    synthetic_scgpt_gene_vocab,
    write_synthetic_geneformer_dictionaries,
    write_tiny_geneformer,
    write_tiny_scgpt,
)

ATOL = 1e-5
N_LAYERS = 3
ROOT = Path(__file__).resolve().parents[1]

# The official encoder's nested-tensor fast path announces itself as a prototype API; expected here.
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")

GF_SOURCES = [
    pytest.param("real", marks=pytest.mark.skipif(not have_real_geneformer_dicts(), reason="no shared V2 dictionaries")),
    "synthetic",
]
SC_SOURCES = [
    pytest.param("real", marks=pytest.mark.skipif(not have_real_scgpt_vocab(), reason="no shared scGPT vocab")),
    "synthetic",
]


def assert_close_at(a_BTD: torch.Tensor, b_BTD: torch.Tensor, keep_BT: torch.Tensor, atol: float = ATOL) -> None:
    """Equal within atol at real (non-pad) positions; padded outputs are meaningless."""
    diff = (a_BTD - b_BTD)[keep_BT].abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3g} > {atol}"


pytestmark = pytest.mark.usefixtures("linear_route")  # every test on both linear routes (conftest.py)


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    # These models are tiny: intra-op threads only add hand-off cost (and stall badly when the
    # machine's cores are busy), so run single-threaded and restore the setting afterwards.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module", params=GF_SOURCES)
def gf(request, tmp_path_factory) -> GeneformerBackend:
    root = tmp_path_factory.mktemp(f"gf_{request.param}")
    dict_dir = None if request.param == "real" else write_synthetic_geneformer_dictionaries(root / "dicts")
    model_dir, dict_dir = write_tiny_geneformer(root, dictionary_dir=dict_dir, n_layers=N_LAYERS, seed=1)
    return load_backend("geneformer", model_dir, dict_dir)


@pytest.fixture(scope="module")
def gf_files(tmp_path_factory) -> tuple[Path, Path]:
    """Default fixture (real dictionaries when present) for the error tests, which copy it."""
    return write_tiny_geneformer(tmp_path_factory.mktemp("gf_default"), n_layers=2)


@pytest.fixture(scope="module", params=SC_SOURCES)
def sc(request, tmp_path_factory) -> ScGPTBackend:
    root = tmp_path_factory.mktemp(f"sc_{request.param}")
    vocab = None if request.param == "real" else synthetic_scgpt_gene_vocab()
    model_dir = write_tiny_scgpt(root, n_layers=N_LAYERS, seed=2, gene_vocab=vocab)
    return load_backend("scgpt", model_dir)


@pytest.fixture(scope="module")
def sc_dir(tmp_path_factory) -> Path:
    return write_tiny_scgpt(tmp_path_factory.mktemp("sc_default"), n_layers=2)


def _env_with_paths() -> dict[str, str]:
    """The environment for a child Python that imports ctrace and the test fixtures."""
    paths = [str(ROOT / "lib"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _padded_batch(backend, seed: int = 0):
    cells = random_cells(backend, 5, 4, 40, seed)
    batch = backend.collate(cells)
    assert not bool(batch.keep_BT.all()), "the test batch must contain padding"
    return cells, batch


# ---- Geneformer: files ----------------------------------------------------------------------------------
def test_geneformer_checkpoint_has_official_key_pattern(gf_files):
    model_dir, dict_dir = gf_files
    n_layers = 2
    with safe_open(model_dir / "model.safetensors", framework="pt") as handle:
        keys = set(handle.keys())
        dtypes = {handle.get_slice(k).get_dtype() for k in keys}
    embeddings = {f"bert.embeddings.{n}" for n in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias")}
    per_block = [f"{m}.{p}" for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
        for p in ("weight", "bias")]
    blocks = {f"bert.encoder.layer.{i}.{k}" for i in range(n_layers) for k in per_block}
    head = {"cls.predictions.bias"} | {f"cls.predictions.transform.{m}.{p}"
                                       for m in ("dense", "LayerNorm") for p in ("weight", "bias")}
    assert keys == embeddings | blocks | head
    assert len(keys) == 5 + 16 * n_layers + 5
    assert dtypes == {"F32"}
    config = json.loads((model_dir / "config.json").read_text())
    token_dict = load_geneformer_dictionaries(dict_dir).token_dict
    assert config["architectures"] == ["BertForMaskedLM"] and config["model_type"] == "bert"
    assert config["vocab_size"] == len(token_dict)
    assert (config["pad_token_id"], config["hidden_act"], config["layer_norm_eps"]) == (0, "relu", 1e-12)
    if have_real_geneformer_dicts():
        assert config["vocab_size"] == 20275


# ---- Geneformer: parity -------------------------------------------------------------------------------
def _hf_hidden_states(backend: GeneformerBackend, batch):
    with torch.no_grad():
        out = backend.reference_model()(
            input_ids=batch.input_ids_BT, attention_mask=batch.keep_BT.long(), output_hidden_states=True
        )
    assert len(out.hidden_states) == backend.n_layers + 1
    return out


def test_geneformer_embed_and_hidden_states_match_hf_forward(gf):
    _, batch = _padded_batch(gf)
    hf = _hf_hidden_states(gf, batch)
    with torch.no_grad():
        assert_close_at(gf.embed(batch), hf.hidden_states[0], batch.keep_BT)
    hidden = gf.hidden_states(batch, range(gf.n_layers))
    assert sorted(hidden) == list(range(gf.n_layers))
    for layer, h_BTD in hidden.items():
        assert h_BTD.shape == (*batch.input_ids_BT.shape, gf.d_model)
        assert_close_at(h_BTD, hf.hidden_states[layer + 1], batch.keep_BT)


def test_geneformer_resume_from_every_layer_matches_hf_forward(gf):
    _, batch = _padded_batch(gf, seed=1)
    hf = _hf_hidden_states(gf, batch)
    for source in range(gf.n_layers):
        resumed = dict(gf.resume(hf.hidden_states[source + 1], batch, source))
        assert sorted(resumed) == list(range(source + 1, gf.n_layers))
        for layer, h_BTD in resumed.items():
            assert_close_at(h_BTD, hf.hidden_states[layer + 1], batch.keep_BT)


def test_geneformer_padded_batch_equals_cells_one_by_one(gf):
    cells, batch = _padded_batch(gf, seed=2)
    batched = gf.hidden_states(batch, range(gf.n_layers))
    for row, cell in enumerate(cells):
        single = gf.collate([cell])
        assert bool(single.keep_BT.all())  # the no-mask path
        alone = gf.hidden_states(single, range(gf.n_layers))
        t = len(cell.input_ids)
        for layer in range(gf.n_layers):
            assert_close_at(batched[layer][row : row + 1, :t], alone[layer], single.keep_BT)


def _read_pairs(batch, n_per_row: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (row, position) pairs at real tokens: row 0 gets many, the others a few (as in a sweep)."""
    g = torch.Generator().manual_seed(seed)
    rows, pos = [], []
    for row in range(batch.keep_BT.shape[0]):
        real = torch.nonzero(batch.keep_BT[row].cpu()).flatten()
        n = len(real) if row == 0 else min(n_per_row, len(real))
        pick = real[torch.randperm(len(real), generator=g)[:n]]
        rows.append(torch.full((n,), row, dtype=torch.long))
        pos.append(pick)
    return torch.cat(rows), torch.cat(pos)


def _block_at_batch(backend, padded: bool, n_cells: int):
    """A padded batch of cells of different lengths, or n_cells cells of one length (no padding)."""
    if padded:
        return _padded_batch(backend, seed=5)[1]
    batch = backend.collate(random_cells(backend, n_cells, 20, 20, seed=5))
    assert bool(batch.keep_BT.all())
    return batch


@pytest.mark.parametrize("padded", [True, False])
def test_geneformer_block_at_matches_hf_forward(gf, padded):
    """block_at (keys/values everywhere, the rest at the queries only) = the HF layer's output there."""
    batch = _block_at_batch(gf, padded, n_cells=4)
    hf = _hf_hidden_states(gf, batch)
    rows_N, pos_N = _read_pairs(batch, 3, seed=6)
    for layer in range(gf.n_layers):
        with torch.no_grad():
            at_ND = gf.block_at(hf.hidden_states[layer], batch, layer, rows_N, pos_N)
        want_ND = hf.hidden_states[layer + 1][rows_N, pos_N]
        assert at_ND.shape == want_ND.shape
        assert (at_ND - want_ND).abs().max().item() <= ATOL
        # and the same numbers as the whole block run by run_blocks
        ((_, full_BTD),) = list(gf.run_blocks(hf.hidden_states[layer], batch, layer, layer))
        assert (at_ND - full_BTD[rows_N, pos_N]).abs().max().item() <= ATOL


@pytest.mark.parametrize("padded", [True, False])
def test_geneformer_block_at_under_bf16_autocast_matches_the_whole_block(gf, padded):
    """Under bf16 autocast (the sweep's GPU option; CPU autocast runs the same code) block_at still
    equals the whole block read at the pairs, up to bf16 rounding, and stays near the fp32 result."""
    batch = _block_at_batch(gf, padded, n_cells=4)
    hf = _hf_hidden_states(gf, batch)
    rows_N, pos_N = _read_pairs(batch, 3, seed=6)
    for layer in range(gf.n_layers):
        h_BTD = hf.hidden_states[layer]
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            at_ND = gf.block_at(h_BTD, batch, layer, rows_N, pos_N)
            ((_, full_BTD),) = list(gf.run_blocks(h_BTD, batch, layer, layer))
        assert at_ND.shape == (rows_N.numel(), gf.d_model)
        assert (at_ND.float() - full_BTD[rows_N, pos_N].float()).abs().max().item() <= 0.05
        want_ND = hf.hidden_states[layer + 1][rows_N, pos_N]
        assert (at_ND.float() - want_ND).abs().max().item() <= 0.15


def test_geneformer_block_at_identical_rows_give_identical_outputs(gf):
    """Two equal rows read at the same positions give bit-identical outputs (what δ = 0 relies on)."""
    cell = random_cells(gf, 1, 30, 30, seed=7)[0]
    batch = gf.collate([cell, cell, cell])
    with torch.no_grad():
        h = gf.embed(batch)
        rows_N = torch.tensor([0] * 20 + [1, 1, 2])
        pos_N = torch.cat([torch.arange(5, 25), torch.tensor([7, 11, 11])])
        out = gf.block_at(h, batch, 0, rows_N, pos_N)
    assert torch.equal(out[20], out[2]) and torch.equal(out[21], out[6]) and torch.equal(out[22], out[6])


def test_geneformer_backend_never_imports_transformers(gf_files):
    """Loading and running the backend needs no `transformers` (its import costs ~5 s in every job)."""
    model_dir, dict_dir = gf_files
    code = (
        "import sys; from ctrace.models import load_backend; from model_fixtures import random_cells; "
        f"b = load_backend('geneformer', {str(model_dir)!r}, {str(dict_dir)!r}); "
        "batch = b.collate(random_cells(b, 2, 5, 9, 0)); h = b.hidden_states(batch, [b.n_layers - 1]); "
        "b.mlm_logits(h[b.n_layers - 1]); print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env_with_paths())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_geneformer_reference_model_is_independent_of_the_backend(gf_files):
    backend = load_backend("geneformer", *gf_files)
    _, batch = _padded_batch(backend, seed=8)
    with torch.no_grad():
        before = backend.hidden_states(batch, [0])[0]
        backend.reference_model().bert.encoder.layer[0].attention.self.key.weight.mul_(0.5)
        after = backend.hidden_states(batch, [0])[0]
    assert torch.equal(before, after)


@pytest.mark.parametrize("layout", ["pytorch_model.bin", "sharded safetensors"])
def test_geneformer_other_weight_files_load_identically(gf_files, tmp_path, layout):
    """pytorch_model.bin and a sharded model.safetensors.index.json (what from_pretrained also reads)."""
    model_dir, dict_dir = gf_files
    tensors = load_file(model_dir / "model.safetensors")
    target = tmp_path / "model"
    target.mkdir()
    shutil.copy(model_dir / "config.json", target)
    if layout == "pytorch_model.bin":
        torch.save(tensors, target / "pytorch_model.bin")
    else:
        keys = sorted(tensors)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in halves.items():
            save_file({k: tensors[k] for k in part}, target / name, metadata={"format": "pt"})
        weight_map = {k: name for name, part in halves.items() for k in part}
        (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    original, variant = load_backend("geneformer", model_dir, dict_dir), load_backend("geneformer", target, dict_dir)
    _, batch = _padded_batch(original, seed=9)
    with torch.no_grad():
        a = original.hidden_states(batch, [original.n_layers - 1])[original.n_layers - 1]
        b = variant.hidden_states(batch, [variant.n_layers - 1])[variant.n_layers - 1]
    assert torch.equal(a, b)


def test_geneformer_unreadable_weights_are_refused(gf_files, tmp_path):
    model_dir, dict_dir = gf_files
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    data = (target / "model.safetensors").read_bytes()
    (target / "model.safetensors").write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(CtraceInputError, match=r"model\.safetensors: cannot be read as safetensors"):
        load_backend("geneformer", target, dict_dir)
    (target / "model.safetensors").unlink()
    (target / "pytorch_model.bin").write_bytes(b"not a torch file")
    with pytest.raises(CtraceInputError, match=r"pytorch_model\.bin: cannot be read as a weights-only torch file"):
        load_backend("geneformer", target, dict_dir)
    (target / "pytorch_model.bin").unlink()
    with pytest.raises(CtraceInputError, match="no weights file"):
        load_backend("geneformer", target, dict_dir)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("hidden_act", "swish", r"config\.json: hidden_act 'swish' is not supported"),
        ("hidden_act", ["relu"], r"config\.json: hidden_act \['relu'\] is not supported"),
        ("layer_norm_eps", "x", r"config\.json: 'layer_norm_eps' must be a small positive number .*found 'x'"),
        ("layer_norm_eps", None, r"'layer_norm_eps' must be a small positive number .*found None"),
        ("layer_norm_eps", -1e-12, r"'layer_norm_eps' must be a small positive number"),
    ],
)
def test_geneformer_unsupported_config_values_are_refused(gf_files, tmp_path, field, value, message):
    model_dir, dict_dir = gf_files
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(CtraceInputError, match=message):
        load_backend("geneformer", target, dict_dir)


def test_geneformer_gene_mask_and_mlm_logits(gf):
    cells, batch = _padded_batch(gf, seed=3)
    for row, cell in enumerate(cells):
        t = len(cell.input_ids)
        assert cell.input_ids[0] == gf.cls_token_id and cell.input_ids[-1] == gf.eos_token_id
        assert batch.gene_BT[row].tolist() == [False] + [True] * (t - 2) + [False] * (batch.keep_BT.shape[1] - t + 1)
    hf = _hf_hidden_states(gf, batch)
    with torch.no_grad():
        hf_logits = gf.reference_model()(input_ids=batch.input_ids_BT, attention_mask=batch.keep_BT.long()).logits
        logits = gf.mlm_logits(hf.hidden_states[-1])
    assert logits.shape == (*batch.input_ids_BT.shape, gf.vocab_size)
    assert_close_at(logits, hf_logits, batch.keep_BT, atol=1e-4)


def test_geneformer_device_and_dtype_are_honoured(gf_files):
    model_dir, dict_dir = gf_files
    b32 = load_backend("geneformer", model_dir, dict_dir)
    b64 = load_backend("geneformer", model_dir, dict_dir, dtype=torch.float64, device="cpu")
    reference = b64.reference_model()
    assert {p.dtype for p in reference.parameters()} == {torch.float64} and not reference.training
    assert b64.device == torch.device("cpu")
    _, batch = _padded_batch(b32)
    h32 = b32.hidden_states(batch, [b32.n_layers - 1])[b32.n_layers - 1]
    h64 = b64.hidden_states(batch, [b64.n_layers - 1])[b64.n_layers - 1]
    assert h64.dtype == torch.float64
    assert_close_at(h64.float(), h32, batch.keep_BT)


# ---- Geneformer: bad input ----------------------------------------------------------------------------------
def _edited_gf(gf_files, tmp_path, edit) -> tuple[Path, Path]:
    model_dir, dict_dir = gf_files
    target = tmp_path / "model"
    shutil.copytree(model_dir, target)
    tensors = load_file(target / "model.safetensors")
    edit(tensors)
    save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    return target, dict_dir


def test_geneformer_renamed_key_is_refused(gf_files, tmp_path):
    old = "bert.encoder.layer.1.attention.self.key.weight"
    new = "bert.encoder.layer.1.attention.self.keys.weight"
    model_dir, dict_dir = _edited_gf(gf_files, tmp_path, lambda t: t.__setitem__(new, t.pop(old)))
    with pytest.raises(CtraceInputError, match="missing") as err:
        load_backend("geneformer", model_dir, dict_dir)
    assert old in str(err.value) and new in str(err.value)


def test_geneformer_missing_key_is_refused(gf_files, tmp_path):
    key = "bert.encoder.layer.0.output.LayerNorm.bias"
    model_dir, dict_dir = _edited_gf(gf_files, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CtraceInputError, match=key.replace(".", r"\.")):
        load_backend("geneformer", model_dir, dict_dir)


def test_geneformer_missing_mlm_bias_is_refused(gf_files, tmp_path):
    # Only the tied decoder may be absent; its bias source `cls.predictions.bias` may not.
    model_dir, dict_dir = _edited_gf(gf_files, tmp_path, lambda t: t.pop("cls.predictions.bias"))
    with pytest.raises(CtraceInputError, match=r"cls\.predictions\.bias"):
        load_backend("geneformer", model_dir, dict_dir)


def test_geneformer_wrong_shape_is_refused(gf_files, tmp_path):
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    model_dir, dict_dir = _edited_gf(gf_files, tmp_path, lambda t: t.__setitem__(key, torch.zeros(16, 32)))
    with pytest.raises(CtraceInputError, match="wrong shape") as err:
        load_backend("geneformer", model_dir, dict_dir)
    assert key in str(err.value)


@pytest.mark.parametrize(
    "field, value", [("architectures", ["BertForSequenceClassification"]), ("model_type", "roberta")]
)
def test_geneformer_wrong_architecture_is_refused(gf_files, tmp_path, field, value):
    model_dir, dict_dir = _edited_gf(gf_files, tmp_path, lambda t: None)
    config = json.loads((model_dir / "config.json").read_text())
    config[field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CtraceInputError, match=field) as err:
        load_backend("geneformer", model_dir, dict_dir)
    assert "config.json" in str(err.value) and "BertForMaskedLM" in str(err.value)


def test_geneformer_dictionary_of_another_model_is_refused(gf_files, tmp_path):
    model_dir, _ = gf_files
    other = write_synthetic_geneformer_dictionaries(tmp_path / "other", n_genes=17)
    with pytest.raises(CtraceInputError, match="vocab_size"):
        load_backend("geneformer", model_dir, other)


def test_load_backend_arguments_are_checked(gf_files, sc_dir):
    model_dir, dict_dir = gf_files
    with pytest.raises(CtraceInputError, match="dictionary_dir"):
        load_backend("geneformer", model_dir)
    with pytest.raises(CtraceInputError, match="dictionary"):
        load_backend("scgpt", sc_dir, dict_dir)
    with pytest.raises(CtraceInputError, match="not supported"):
        load_backend("scfoundation", model_dir)


# ---- scGPT: files --------------------------------------------------------------------------------------------
WHOLE_HUMAN_KEYS = (
    "data_source save_dir load_model n_hvg valid_size_or_ratio dist_backend grad_accu_steps pad_token "
    "input_style input_emb_style n_bins max_seq_len training_tasks dist_url mask_ratio trunc_by_sample "
    "vocab_path rank batch_size eval_batch_size epochs lr scheduler_interval scheduler_factor "
    "warmup_ratio_or_step no_cls no_cce fp16 fast_transformer nlayers nheads embsize d_hid dropout "
    "n_layers_cls log_interval save_interval mask_value pad_value USE_CLS USE_CCE MVC "
    "USE_GENERATIVE_TRAINING world_size distributed local_rank gpu"
).split()


def test_scgpt_checkpoint_has_whole_human_layout(sc_dir):
    state = torch.load(sc_dir / "best_model.pt", weights_only=True)
    args = json.loads((sc_dir / "args.json").read_text())
    vocab = load_scgpt_vocab(sc_dir)
    d, n_layers = args["embsize"], args["nlayers"]
    assert list(args) == WHOLE_HUMAN_KEYS and len(args) == 47
    assert (args["pad_value"], args["n_bins"], args["input_emb_style"]) == (-2, 51, "continuous")
    assert not any("in_proj" in k or "_impl" in k for k in state)
    assert not any(k.startswith("cls_decoder.") for k in state)
    assert tuple(state["flag_encoder.weight"].shape) == (2, d)
    for i in range(n_layers):
        block = sorted(k.split(f"layers.{i}.", 1)[1] for k in state if k.startswith(f"transformer_encoder.layers.{i}."))
        assert block == sorted(f"{m}.{p}" for m in ("self_attn.Wqkv", "self_attn.out_proj", "linear1", "linear2",
                                                     "norm1", "norm2") for p in ("weight", "bias"))
        assert tuple(state[f"transformer_encoder.layers.{i}.self_attn.Wqkv.weight"].shape) == (3 * d, d)
    assert {k for k in state if k.startswith(("decoder.", "mvc_decoder."))} == {
        *(f"decoder.fc.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")),
        "mvc_decoder.gene2query.weight", "mvc_decoder.gene2query.bias", "mvc_decoder.W.weight"}
    assert all(t.dtype == torch.float32 for t in state.values())
    n = len(vocab)
    assert [vocab["<pad>"], vocab["<cls>"], vocab["<eoc>"]] == [n - 3, n - 2, n - 1]
    assert tuple(state["encoder.embedding.weight"].shape) == (n, d)
    raw = json.loads((sc_dir / "vocab.json").read_text())
    assert len(raw) == n and list(raw.values()) != sorted(raw.values())  # shuffled key order, as upstream
    if have_real_scgpt_vocab():
        assert n == 60697 and vocab["<pad>"] == 60694 and vocab["GAPDH"] == 9833


# ---- scGPT: parity -----------------------------------------------------------------------------------------------
def _official_layerwise(backend: ScGPTBackend, h0_BTD, pad_BT):
    """Each official layer called in turn with torch defaults (fast path on)."""
    out, h = [], h0_BTD
    for layer in backend.module.transformer_encoder.layers:
        h = layer(h, src_key_padding_mask=pad_BT)
        out.append(h)
    return out


def test_scgpt_embed_matches_module_arithmetic(sc):
    _, batch = _padded_batch(sc)
    m = sc.module
    with torch.no_grad():
        h0 = sc.embed(batch)
        emb = torch.nn.functional.layer_norm(m.encoder.embedding(batch.input_ids_BT), (sc.d_model,),
                                             m.encoder.enc_norm.weight, m.encoder.enc_norm.bias, 1e-5)
        v = torch.relu(m.value_encoder.linear1(batch.values_BT.unsqueeze(-1)))
        v = torch.nn.functional.layer_norm(m.value_encoder.linear2(v), (sc.d_model,),
                                           m.value_encoder.norm.weight, m.value_encoder.norm.bias, 1e-5)
        assert_close_at(h0, emb + v, batch.keep_BT)
        # values clamp at 512 (upstream max_value)
        big = m.value_encoder(torch.tensor([[512.0, 10_000.0, 511.0]], dtype=sc.dtype))
        assert torch.equal(big[0, 0], big[0, 1]) and not torch.equal(big[0, 0], big[0, 2])


def test_scgpt_hidden_states_match_official_forward(sc):
    _, batch = _padded_batch(sc, seed=1)
    pad_BT = ~batch.keep_BT
    with torch.no_grad():
        h0 = sc.embed(batch)
        official_last = sc.module.transformer_encoder(h0, src_key_padding_mask=pad_BT)
        official = _official_layerwise(sc, h0, pad_BT)
        whole = sc.module(batch.input_ids_BT, batch.values_BT, pad_BT)
    # the nested-tensor fast path really ran: it returns exact zeros at padding
    assert bool((official_last[pad_BT] == 0).all())
    hidden = sc.hidden_states(batch, range(sc.n_layers))
    for layer in range(sc.n_layers):
        assert_close_at(hidden[layer], official[layer], batch.keep_BT)
    assert_close_at(hidden[sc.n_layers - 1], official_last, batch.keep_BT)
    assert_close_at(whole, official_last, batch.keep_BT)


def test_scgpt_resume_from_every_layer_matches_official_forward(sc):
    _, batch = _padded_batch(sc, seed=2)
    pad_BT = ~batch.keep_BT
    with torch.no_grad():
        h0 = sc.embed(batch)
        official_last = sc.module.transformer_encoder(h0, src_key_padding_mask=pad_BT)
        official = _official_layerwise(sc, h0, pad_BT)
    last = sc.n_layers - 1
    for source in range(sc.n_layers):
        resumed = dict(sc.resume(official[source], batch, source))
        assert sorted(resumed) == list(range(source + 1, sc.n_layers))
        for layer, h_BTD in resumed.items():
            assert_close_at(h_BTD, official[layer], batch.keep_BT)
        final = resumed.get(last, official[last])
        assert_close_at(final, official_last, batch.keep_BT)


def test_scgpt_block_matches_post_ln_math(sc):
    """Independent re-derivation of block 0: h = norm1(x + SA(x)); out = norm2(h + W2 relu(W1 h))."""
    _, batch = _padded_batch(sc, seed=3)
    layer = sc.module.transformer_encoder.layers[0]
    heads = layer.self_attn.num_heads
    with torch.no_grad():
        x = sc.embed(batch)
        (_, ours), = list(sc.run_blocks(x, batch, 0, 0))
        b, t, d = x.shape
        qkv = torch.nn.functional.linear(x, layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias)
        q, k, v = (z.view(b, t, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=-1))
        scores = q @ k.transpose(-1, -2) / (d // heads) ** 0.5
        scores = scores.masked_fill(~batch.keep_BT[:, None, None, :], float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        h = layer.norm1(x + layer.self_attn.out_proj(attn))
        ref = layer.norm2(h + layer.linear2(torch.relu(layer.linear1(h))))
    assert_close_at(ours, ref, batch.keep_BT)


def test_scgpt_padded_batch_equals_cells_one_by_one(sc):
    cells, batch = _padded_batch(sc, seed=4)
    batched = sc.hidden_states(batch, range(sc.n_layers))
    for row, cell in enumerate(cells):
        single = sc.collate([cell])
        alone = sc.hidden_states(single, range(sc.n_layers))
        t = len(cell.input_ids)
        for layer in range(sc.n_layers):
            assert_close_at(batched[layer][row : row + 1, :t], alone[layer], single.keep_BT)


@pytest.mark.parametrize("padded", [True, False])
def test_scgpt_block_at_matches_official_layers(sc, padded):
    """block_at (keys/values everywhere, the rest at the queries only) = the official layer's output at the pairs."""
    batch = _block_at_batch(sc, padded, n_cells=3)
    rows_N, pos_N = _read_pairs(batch, 3, seed=6)
    with torch.no_grad():
        h0 = sc.embed(batch)
        official = _official_layerwise(sc, h0, ~batch.keep_BT)
    inputs = [h0, *official[:-1]]
    for layer in range(sc.n_layers):
        with torch.no_grad():
            at_ND = sc.block_at(inputs[layer], batch, layer, rows_N, pos_N)
        assert (at_ND - official[layer][rows_N, pos_N]).abs().max().item() <= ATOL


# ---- both back-ends: the `Edits` hint (rows that copy base rows except at listed pairs) ------------------------
def _edited_copies(backend, seed: int):
    """Two cells of different lengths in base rows 0 and 1 (right-padded), then copies of them edited at a
    few positions: rows 2, 3 copy row 0, rows 4, 5 copy row 1; row 5's one edit is 0."""
    short, long = random_cells(backend, 1, 17, 17, seed=seed)[0], random_cells(backend, 1, 24, 24, seed=seed + 1)[0]
    batch = backend.collate([short, long, short, short, long, long])
    rows_N = torch.tensor([2, 2, 3, 4, 4, 4, 5])
    pos_N = torch.tensor([3, 9, 5, 1, 2, 20, 7])
    edit_ND = torch.randn(rows_N.numel(), backend.d_model, generator=torch.Generator().manual_seed(seed))
    edit_ND[-1] = 0.0
    with torch.no_grad():
        h_BTD = backend.embed(batch).clone()
    h_BTD[rows_N, pos_N] += edit_ND
    edits = Edits(bases_K=torch.tensor([0, 1]), slot_B=torch.tensor([0, 1, 0, 0, 1, 1]), rows_N=rows_N, pos_N=pos_N)
    return batch, h_BTD, edits


def _check_edits(backend, seed: int) -> None:
    """With the hint, run_blocks and block_at give the dense results; row 5 (edit 0) stays bit-identical
    to its base row 1; and the hint is really used: an edit at an unlisted position is not seen by q/k/v."""
    batch, h_BTD, edits = _edited_copies(backend, seed)
    # (1, 7) and (5, 7) read the same state; edited row 4 is read at 3 positions, so that its queries span
    # two chunks of block_at (each must see row 4's edited keys and values)
    read_rows = torch.tensor([0, 0, 1, 1, 2, 3, 4, 4, 4, 5, 5])
    read_pos = torch.tensor([7, 12, 9, 7, 9, 5, 20, 1, 3, 7, 15])
    last = backend.n_layers - 1
    with torch.no_grad():
        for layer in range(backend.n_layers):
            dense = dict(backend.run_blocks(h_BTD, batch, layer, last))
            sparse = dict(backend.run_blocks(h_BTD, batch, layer, last, edits))
            keep = batch.keep_BT
            for index in dense:
                assert (dense[index] - sparse[index])[keep].abs().max().item() <= ATOL
                assert torch.equal(sparse[index][5], sparse[index][1])
            at = backend.block_at(h_BTD, batch, layer, read_rows, read_pos, edits)
            assert (at - dense[layer][read_rows, read_pos]).abs().max().item() <= ATOL
            assert torch.equal(at[9], at[3])
            broken_BTD = h_BTD.clone()
            broken_BTD[3, 11] += 10.0  # outside the promise
            ((_, honest),) = backend.run_blocks(broken_BTD, batch, layer, layer)
            ((_, hinted),) = backend.run_blocks(broken_BTD, batch, layer, layer, edits)
            assert (honest[3] - hinted[3])[keep[3]].abs().max().item() > 100 * ATOL
            assert (honest[2] - hinted[2])[keep[2]].abs().max().item() <= ATOL


def test_geneformer_edits_hint(gf):
    _check_edits(gf, seed=11)


def test_scgpt_edits_hint(sc):
    _check_edits(sc, seed=12)


def test_scgpt_expr_prediction_and_gene_mask(sc):
    cells, batch = _padded_batch(sc, seed=5)
    h = sc.hidden_states(batch, [sc.n_layers - 1])[sc.n_layers - 1]
    with torch.no_grad():
        pred = sc.expr_prediction(h)
        ref = sc.module.decoder.fc(h).squeeze(-1)
    assert pred.shape == batch.input_ids_BT.shape
    assert torch.equal(pred, ref)
    assert batch.values_BT[batch.keep_BT.logical_not()].eq(sc.pad_value).all()
    assert batch.input_ids_BT[batch.keep_BT.logical_not()].eq(sc.pad_token_id).all()
    assert not batch.gene_BT[:, 0].any() and batch.gene_BT.sum() == batch.keep_BT.sum() - len(cells)


def test_scgpt_device_and_dtype_are_honoured(sc_dir):
    b32 = load_backend("scgpt", sc_dir)
    b64 = load_backend("scgpt", sc_dir, dtype=torch.float64)
    assert {p.dtype for p in b64.module.parameters()} == {torch.float64} and not b64.module.training
    assert b64.pad_value == -2.0 and b64.n_layers == 2
    _, batch = _padded_batch(b32)
    h32 = b32.hidden_states(batch, [1])[1]
    h64 = b64.hidden_states(batch, [1])[1]
    assert h64.dtype == torch.float64
    assert_close_at(h64.float(), h32, batch.keep_BT)


# ---- scGPT: naming variants and bad input -------------------------------------------------------------------------
def _edited_sc(sc_dir, tmp_path, edit) -> Path:
    target = tmp_path / "scgpt"
    shutil.copytree(sc_dir, target)
    state = torch.load(target / "best_model.pt", weights_only=True)
    state = edit(state) or state
    torch.save(state, target / "best_model.pt")
    return target


def _rename_all(state, old, new):
    return {k.replace(old, new): v for k, v in state.items()}


@pytest.mark.parametrize(
    "old, new",
    [(".self_attn.", ".self_attn._impl."),  # newest upstream wrapper names
     (".self_attn.Wqkv.weight", ".self_attn.in_proj_weight")],  # torch names (bias stays flash: mixed)
)
def test_scgpt_naming_variants_load_identically(sc_dir, tmp_path, old, new):
    reference = load_backend("scgpt", sc_dir)
    variant = load_backend("scgpt", _edited_sc(sc_dir, tmp_path, lambda s: _rename_all(s, old, new)))
    for a, b in zip(reference.module.state_dict().values(), variant.module.state_dict().values()):
        assert torch.equal(a, b)


def test_scgpt_cls_decoder_and_flag_encoder_are_ignored(sc_dir, tmp_path):
    def add_cls(state):
        state["cls_decoder._decoder.0.weight"] = torch.zeros(32, 32)
        state["cls_decoder.out_layer.weight"] = torch.zeros(1, 32)

    backend = load_backend("scgpt", _edited_sc(sc_dir, tmp_path, add_cls))
    assert not hasattr(backend.module, "cls_decoder") and not hasattr(backend.module, "flag_encoder")


def test_scgpt_without_heads_loads_but_has_no_expr_prediction(sc_dir, tmp_path):
    def drop_heads(state):
        return {k: v for k, v in state.items() if not k.startswith(("decoder.", "mvc_decoder."))}

    backend = load_backend("scgpt", _edited_sc(sc_dir, tmp_path, drop_heads))
    assert not backend.has_expr_decoder and not backend.has_mvc_decoder
    with pytest.raises(CtraceInputError, match="decoder"):
        backend.expr_prediction(torch.zeros(1, 2, backend.d_model))


def test_scgpt_renamed_key_is_refused(sc_dir, tmp_path):
    old = "transformer_encoder.layers.1.linear1.weight"
    new = "transformer_encoder.layers.1.linear_1.weight"
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: s.__setitem__(new, s.pop(old)))
    with pytest.raises(CtraceInputError, match="unexpected") as err:
        load_backend("scgpt", model_dir)
    assert old in str(err.value) and new in str(err.value)


@pytest.mark.parametrize(
    "key", ["transformer_encoder.layers.0.self_attn.Wqkv.weight", "value_encoder.norm.bias", "decoder.fc.4.bias"]
)
def test_scgpt_missing_key_is_refused(sc_dir, tmp_path, key):
    def drop(state):
        del state[key]

    model_dir = _edited_sc(sc_dir, tmp_path, drop)
    with pytest.raises(CtraceInputError, match="missing") as err:
        load_backend("scgpt", model_dir)
    assert key in str(err.value)


def test_scgpt_wrong_shape_is_refused(sc_dir, tmp_path):
    key = "transformer_encoder.layers.1.self_attn.Wqkv.weight"
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: s.__setitem__(key, torch.zeros(48, 32)))
    with pytest.raises(CtraceInputError, match="wrong shape") as err:
        load_backend("scgpt", model_dir)
    assert key in str(err.value)


def test_scgpt_vocab_of_another_model_is_refused(sc_dir, tmp_path):
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: None)
    vocab = {f"G{i}": i for i in range(10)} | {"<pad>": 10, "<cls>": 11, "<eoc>": 12}
    (model_dir / "vocab.json").write_text(json.dumps(vocab))
    with pytest.raises(CtraceInputError, match=r"encoder\.embedding\.weight") as err:
        load_backend("scgpt", model_dir)
    assert "vocab.json" in str(err.value)


def test_scgpt_unknown_key_and_wrapped_checkpoint_are_refused(sc_dir, tmp_path):
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: s.__setitem__("dsbn.bns.0.weight", torch.ones(32)))
    with pytest.raises(CtraceInputError, match=r"dsbn\.bns\.0\.weight"):
        load_backend("scgpt", model_dir)
    shutil.rmtree(model_dir)
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: {"model_state_dict": s, "epoch": 3})
    with pytest.raises(CtraceInputError, match="plain state dict"):
        load_backend("scgpt", model_dir)


@pytest.mark.parametrize("key", ["embsize", "pad_value"])
def test_scgpt_args_json_missing_key_is_refused(sc_dir, tmp_path, key):
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: None)
    args = json.loads((model_dir / "args.json").read_text())
    del args[key]
    (model_dir / "args.json").write_text(json.dumps(args))
    with pytest.raises(CtraceInputError, match=key) as err:
        load_backend("scgpt", model_dir)
    assert "args.json" in str(err.value)


@pytest.mark.parametrize("dropout", [1.5, -0.1, 1])
def test_scgpt_args_json_dropout_out_of_range_is_refused(sc_dir, tmp_path, dropout):
    model_dir = _edited_sc(sc_dir, tmp_path, lambda s: None)
    args = json.loads((model_dir / "args.json").read_text())
    (model_dir / "args.json").write_text(json.dumps({**args, "dropout": dropout}))
    with pytest.raises(CtraceInputError, match=rf"args.json: key 'dropout' must be in \[0, 1\), found {dropout}"):
        load_backend("scgpt", model_dir)
