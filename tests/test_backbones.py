"""Backbones: reference parity, real key lists, checkpoint formats, strictness, training paths.

Large models are only compared by names and shapes on the `meta` device, so nothing big is
allocated except the Base folder (float16 zeros) and the ir-CSN-50 file.
"""
from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.optim import param_groups_layer_decay
from torch import nn

from headernet_core.backbones import (VARIANTS, BackboneInfo, VideoMAEConfig, configs, create_backbone,
                                      csn, load_backbone, videomae)
from headernet_core.backbones.csn import IrCSN
from headernet_core.backbones.videomae import VideoMAEv2
from headernet_core.backbones.base import check_state_dict
from headernet_core.errors import HeaderNetError

DATA = Path(__file__).resolve().parent / "data"   # copied from ../shared (see data/README.md)
FIXTURES = DATA
REFERENCE = DATA / "reference"
SMALL = [("vmae", "tiny"), ("csn", "tiny")]  # every registry variant cheap enough for CPU tests


def _real_keys(name: str) -> dict:
    return json.loads((REFERENCE / name).read_text())


def _meta_state(keys: list, prefix: str) -> dict[str, torch.Tensor]:
    """Names and shapes of a real checkpoint as meta tensors (nothing allocated)."""
    return {k[len(prefix):] if k.startswith(prefix) else k: torch.empty(shape, device="meta")
            for k, shape in keys}


def _write_folder(folder: Path, model_config: dict, state: dict[str, torch.Tensor]) -> Path:
    """A checkpoint folder in the published HF layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "VideoMAEv2_Base",
                                                    "model_config": model_config}))
    save_file({f"model.{k}": v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def _clip(batch: int = 2, frames: int = 8, size: int = 64) -> torch.Tensor:
    return torch.randn(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(0))


def _small(family: str, variant: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return create_backbone(family, variant)[0]


# --- VideoMAE v2: parity with the reference implementation -------------------------------------
def test_vmae_fixture_parity():
    io = np.load(FIXTURES / "vmae_tiny_io.npz")
    model = load_backbone(FIXTURES / "vmae_tiny")
    assert not model.training and model.num_features == 32
    x = torch.from_numpy(io["x"])
    with torch.no_grad():
        torch.testing.assert_close(model.embed_tokens(x), torch.from_numpy(io["tokens_embedded"]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.forward_tokens(x), torch.from_numpy(io["tokens_final"]),
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x), torch.from_numpy(io["y"]), atol=1e-5, rtol=0)
        # Same weights at 8 frames: the position table follows the token count.
        torch.testing.assert_close(model(torch.from_numpy(io["x_t8"])), torch.from_numpy(io["y_t8"]),
                                   atol=1e-5, rtol=0)


def test_sincos_table_is_prefix_consistent_and_cached():
    short, long = videomae.sincos_table(784, 96), videomae.sincos_table(1568, 96)
    assert short.dtype == torch.float64 and torch.equal(short, long[:784])
    assert torch.equal(long[0, 0::2], torch.zeros(48)) and torch.equal(long[0, 1::2], torch.ones(48))
    model = _small("vmae", "tiny")
    with torch.no_grad():
        model(_clip(1, 4)), model(_clip(1, 4)), model(_clip(1, 8))
    assert sorted(n for n, _, _ in model._pos_cache) == [128, 256]
    assert all(not k.endswith("pos_embed") for k in model.state_dict())


@pytest.mark.parametrize("shape, message", [
    ((1, 3, 7, 64, 64), "multiple of its tubelet_size 2, got 7 frames"),
    ((1, 3, 8, 60, 64), "multiples of its patch_size 8, got 60x64"),
    ((1, 1, 8, 64, 64), "expects clips shaped (B, 3, T, H, W)"),
])
def test_vmae_rejects_bad_input_shapes(shape, message):
    with pytest.raises(HeaderNetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _small("vmae", "tiny")(torch.zeros(shape))


def test_vmae_other_sizes_work():
    model = _small("vmae", "tiny")
    with torch.no_grad():
        assert model(_clip(1, 4, 32)).shape == (1, 64)
        assert model(torch.zeros(1, 3, 2, 48, 80)).shape == (1, 64)


# --- real key lists ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["base", "large", "giant"])
def test_vmae_published_configs_match_real_keys(name):
    real = _real_keys("vmae_real_keys.json")[name]
    config = VideoMAEConfig.from_model_config(real["model_config"], f"{name} config")
    assert config == configs.VMAE_VARIANTS[name]  # the variant table holds the published values
    expected = _meta_state(real["keys"], "model.")
    with torch.device("meta"):
        model = VideoMAEv2(config)
    check_state_dict(model, expected, name)  # same names, same shapes
    assert sum(p.numel() for p in model.parameters()) == real["n_params"]
    # Shape-only inference (a .pth without config.json) recovers the same architecture.
    inferred = videomae.infer_config(expected, name)
    for field in ("patch_size", "embed_dim", "depth", "num_heads", "qkv_bias", "tubelet_size",
                  "use_mean_pooling", "mlp_hidden", "layer_norm_eps"):
        assert getattr(inferred, field) == getattr(config, field), field
    if name == "giant":
        assert config.mlp_hidden == 6144 and model.fc_norm is None and model.norm is not None


def test_vmae_base_folder_from_real_key_list_loads(tmp_path):
    real = _real_keys("vmae_real_keys.json")["base"]
    state = {k[len("model."):]: torch.zeros(shape, dtype=torch.float16) for k, shape in real["keys"]}
    folder = _write_folder(tmp_path / "VideoMAEv2-Base", real["model_config"], state)
    model, info = create_backbone("vmae", "base", checkpoint_root=str(tmp_path))
    assert info == BackboneInfo("vmae", "vmae-base", str(folder), 224, (0.5,) * 3, (0.5,) * 3, 2,
                                arch=info.arch, size_multiple=16)
    assert info.arch["embed_dim"] == 768 and info.arch["depth"] == 12
    assert not model.training and model.num_features == 768
    params = list(model.parameters())
    assert len(model.state_dict()) == real["n_tensors"] == 160
    assert all(p.dtype == torch.float32 and p.requires_grad and not p.is_meta for p in params)
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 2, 32, 32)).shape == (1, 768)


@pytest.mark.parametrize("name, blocks", [("ircsn_r50", (3, 4, 6, 3)), ("ircsn_r152", (3, 8, 36, 3))])
def test_csn_real_key_lists_infer_depth_and_width(name, blocks):
    real = _real_keys("csn_real_keys.json")[name]
    state = csn.convert_state_dict(_meta_state(real["keys"], ""))
    config = csn.infer_config(state, name)
    assert config.stage_blocks == blocks and config.base_channels == 64
    with torch.device("meta"):
        model = IrCSN(config)
    check_state_dict(model, state, name)
    assert sum(p.numel() for p in model.parameters()) == real["n_params_backbone"]
    assert model.num_features == 2048


def test_csn_r50_mmaction_file_loads(tmp_path):
    real = _real_keys("csn_real_keys.json")["ircsn_r50"]
    state = {k: torch.zeros(shape, dtype=torch.long if k.endswith("tracked") else torch.float32)
             for k, shape in real["keys"]}
    for k in state:
        if k.endswith("running_var"):
            state[k].fill_(1.0)
    path = tmp_path / "ircsn_r50.pth"
    torch.save({"meta": {"epoch": 58}, "state_dict": state}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # variant 50 matches the file: no warning
        model, info = create_backbone("csn", "50", ckpt=str(path))
    assert info.name == f"csn:{path}" and info.native_size == 224 and info.frame_multiple == 1
    assert model.config.stage_blocks == (3, 4, 6, 3) and model.config.bn_eps == 1e-3
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 2, 32, 32)).shape == (1, 2048)


# --- checkpoint containers -------------------------------------------------------------------------
def _rule_following_vmae() -> VideoMAEv2:
    """A model whose head count the shape-only inference gets right (64-wide heads)."""
    torch.manual_seed(0)
    return VideoMAEv2(VideoMAEConfig(
        img_size=32, patch_size=8, embed_dim=128, depth=2, num_heads=2, mlp_ratio=2.0,
        qkv_bias=True, layer_norm_eps=1e-6, tubelet_size=2, use_mean_pooling=True)).eval()


def test_vmae_pth_module_container_with_head_and_prefixes(tmp_path):
    model = _rule_following_vmae()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    state |= {"module.head.weight": torch.zeros(2, 128), "module.head.bias": torch.zeros(2)}
    torch.save({"module": state}, tmp_path / "ft.pth")
    with pytest.warns(UserWarning, match="assuming 2 "):
        loaded = load_backbone(tmp_path / "ft.pth")
    assert loaded.config.num_heads == 2 and loaded.config.mlp_hidden == 256
    x = _clip(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_vmae_pth_pretrain_layout_model_key(tmp_path):
    """`model` entry, `_orig_mod.encoder.` prefixes, decoder and mask token dropped, and
    `norm` (no fc_norm) means first-token pooling."""
    torch.manual_seed(0)
    config = _rule_following_vmae().config
    model = VideoMAEv2(VideoMAEConfig(**{**config.to_model_config(), "use_mean_pooling": False})).eval()
    state = {f"_orig_mod.encoder.{k}": v for k, v in model.state_dict().items()}
    state |= {"decoder.blocks.0.norm1.weight": torch.ones(4), "mask_token": torch.zeros(1, 1, 4),
              "encoder_to_decoder.weight": torch.zeros(4, 128)}
    torch.save({"model": state, "epoch": 3}, tmp_path / "pretrain.pth")
    with pytest.warns(UserWarning, match="assuming 2 "):
        loaded = load_backbone(str(tmp_path / "pretrain.pth"))
    assert loaded.config.use_mean_pooling is False
    x = _clip(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_vmae_config_json_beside_pth_wins(tmp_path):
    model = _small("vmae", "tiny").eval()  # 64 wide with 4 heads: not inferable from shapes
    torch.save(model.state_dict(), tmp_path / "flat.pth")
    x = _clip(1, 4)
    with pytest.warns(UserWarning, match="assuming 1"):
        guessed = load_backbone(tmp_path / "flat.pth")
    assert guessed.config.num_heads == 1 and guessed.config.img_size == 224
    config = {**model.config.to_model_config(), "layer_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps({"model_config": config}))
    loaded, info = create_backbone("vmae", "tiny", ckpt=str(tmp_path / "flat.pth"))
    assert loaded.config.num_heads == 4 and loaded.blocks[0].norm1.eps == 1e-5
    assert info.native_size == 64 and info.name == f"vmae:{tmp_path / 'flat.pth'}"
    assert all(m.eps == 1e-5 for m in loaded.modules() if isinstance(m, nn.LayerNorm))
    for module in loaded.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = 1e-6  # back to the original's value: then the outputs agree
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_csn_flat_prefixed_file_without_counters(tmp_path):
    model = _small("csn", "tiny").eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.uniform_(-0.1, 0.1)
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()
             if not k.endswith("num_batches_tracked")}
    state |= {"cls_head.fc_cls.weight": torch.zeros(400, 512), "cls_head.fc_cls.bias": torch.zeros(400)}
    torch.save(state, tmp_path / "csn.pth")
    with pytest.warns(UserWarning, match="--csn_variant 152 ignored"):
        loaded, info = create_backbone("csn", "152", ckpt=tmp_path / "csn.pth")
    assert loaded.config == configs.CSN_VARIANTS["tiny"] and info.source == str(tmp_path / "csn.pth")
    x = _clip(1, 4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


# --- strictness: every bad input is one HeaderNetError naming the problem ---------------------------
def _break_missing(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    del state["model.blocks.1.mlp.fc2.bias"]
    save_file(state, folder / "model.safetensors")


def _break_unexpected(folder: Path) -> None:
    state = load_file(folder / "model.safetensors") | {"model.blocks.0.attn.k_bias": torch.zeros(32)}
    save_file(state, folder / "model.safetensors")


def _break_shape(folder: Path) -> None:
    state = load_file(folder / "model.safetensors") | {"model.fc_norm.weight": torch.ones(16)}
    save_file(state, folder / "model.safetensors")


def _break_safetensors(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        for key, value in changes.items():
            if value is None:
                data["model_config"].pop(key)
            else:
                data["model_config"][key] = value
        (folder / "config.json").write_text(json.dumps(data))
    return edit


@pytest.mark.parametrize("breaker, fragments", [
    (_break_missing, ["model.safetensors", "1 missing key(s): blocks.1.mlp.fc2.bias"]),
    (_break_unexpected, ["1 unexpected key(s): blocks.0.attn.k_bias"]),
    (_break_shape, ["mis-shaped", "fc_norm.weight (16,) (model expects (32,))"]),
    (_break_safetensors, ["model.safetensors: cannot read safetensors file"]),
    (lambda f: (f / "config.json").write_text('{"model_type": "x"}'), ["config.json", '"model_config"']),
    (lambda f: (f / "config.json").write_text("{oops"), ["config.json: not readable JSON"]),
    (lambda f: (f / "config.json").unlink(), ["config.json: not found"]),
    (lambda f: (f / "model.safetensors").unlink(), ["model.safetensors: not found"]),
    (_edit_config(depth=None), ["config.json", "missing key(s) depth"]),
    (_edit_config(depth=3), ["missing key(s): blocks.2.", "depth 3"]),
    (_edit_config(embed_dim=40), ["mis-shaped", "patch_embed.proj.weight"]),
    (_edit_config(depth="2"), ["model_config depth must be an integer"]),
    (_edit_config(init_values=0.1), ["init_values 0.1 (layer scale) is not supported"]),
    (_edit_config(norm_layer="nn.BatchNorm1d"), ["norm_layer 'nn.BatchNorm1d' is not supported"]),
    (_edit_config(extra_key=1), ["unknown model_config key(s) extra_key"]),
])
def test_vmae_folder_errors(tmp_path, breaker, fragments):
    folder = Path(shutil.copytree(FIXTURES / "vmae_tiny", tmp_path / "ckpt"))
    for path in folder.iterdir():
        path.chmod(0o644)
    breaker(folder)
    with pytest.raises(HeaderNetError) as info:
        load_backbone(folder)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_paths_and_unknown_names(tmp_path):
    with pytest.raises(HeaderNetError, match="nope: not found; expected a VideoMAE v2 checkpoint"):
        load_backbone(tmp_path / "nope")
    with pytest.raises(HeaderNetError, match="VideoMAEv2-giant: VideoMAE v2 giant checkpoint "
                                             "folder not found.*--backbone_ckpt"):
        create_backbone("vmae", "giant", checkpoint_root=str(tmp_path))
    with pytest.raises(HeaderNetError, match="unknown backbone family 'resnet'"):
        create_backbone("resnet", "50")
    with pytest.raises(HeaderNetError, match="unknown csn variant '34'.*--csn_variant"):
        create_backbone("csn", "34")
    with pytest.raises(HeaderNetError, match="expected vmae or csn"):
        load_backbone(tmp_path, backbone="x3d")


def test_bad_pth_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(HeaderNetError, match="garbage.pth: cannot read it with torch.load"):
        load_backbone(garbage, backbone="csn")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(HeaderNetError, match="list.pth: expected a dict"):
        load_backbone(tmp_path / "list.pth")
    torch.save({"conv1.conv.weight": torch.zeros(16, 3, 3, 7, 7)}, tmp_path / "stem.pth")
    with pytest.raises(HeaderNetError, match=r"expected residual blocks layer1\.0\.\.N-1"):
        load_backbone(tmp_path / "stem.pth", backbone="csn")
    with pytest.raises(HeaderNetError, match="no 5-D patch_embed.proj.weight"):
        load_backbone(tmp_path / "stem.pth", backbone="vmae")
    state = {k.replace(".bn.", ".norm."): v for k, v in _small("csn", "tiny").state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "upstream.pth")
    with pytest.raises(HeaderNetError, match="missing key.*unexpected key.*upstream header_net"):
        load_backbone(tmp_path / "upstream.pth", backbone="csn")


# --- registry and the training paths ----------------------------------------------------------------
def test_registry_infos_and_warnings():
    assert VARIANTS == {"vmae": ("base", "large", "giant", "tiny"), "csn": ("50", "101", "152", "tiny")}
    with pytest.warns(UserWarning, match="random weights"):
        model, info = create_backbone("vmae", "tiny")
    assert info == BackboneInfo("vmae", "vmae-tiny", None, 64, (0.5,) * 3, (0.5,) * 3, 2,
                                arch=info.arch, size_multiple=8)
    assert not model.training
    with pytest.warns(UserWarning, match="small random model"):
        _, info = create_backbone("csn", "tiny")
    assert info == BackboneInfo("csn", "csn-tiny", None, 64, (0.485, 0.456, 0.406),
                                (0.229, 0.224, 0.225), 1, arch=info.arch, min_size=32)


@pytest.mark.parametrize("family", ["vmae", "csn"])
def test_build_backbone_rebuilds_the_architecture_from_info_arch(family):
    """Trained checkpoints store `info.arch`; `build_backbone` must accept every weight strictly."""
    import json
    from headernet_core.backbones import build_backbone
    model, info = create_backbone(family, "tiny")
    arch = json.loads(json.dumps(info.arch))  # as it comes back from a checkpoint/YAML
    rebuilt = build_backbone(family, arch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 4, 32, 32)
    torch.testing.assert_close(rebuilt(x), model(x))


def test_creation_depends_only_on_torch_seed():
    a, b = _small("csn", "tiny"), _small("csn", "tiny")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("family, variant", SMALL)
def test_forward_backward_every_parameter(family, variant):
    model = _small(family, variant).train()
    out = model(_clip())
    assert out.shape == (2, model.num_features) and out.dtype == torch.float32
    out.square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


@pytest.mark.parametrize("family, variant", SMALL)
def test_grad_checkpointing_equals_plain(family, variant):
    plain = _small(family, variant).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = _clip()
    out_plain, out_ckpt = plain(x), ckpt(x)
    out_plain.square().mean().backward()
    out_ckpt.square().mean().backward()
    torch.testing.assert_close(out_ckpt, out_plain, atol=1e-6, rtol=0)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):  # BN stats counted once
        torch.testing.assert_close(c, b, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("family, variant", SMALL)
def test_grad_checkpointing_with_frozen_early_blocks(family, variant):
    """Partial fine-tuning: only the last block trains; its input does not require grad."""
    model = _small(family, variant).train()
    model.set_grad_checkpointing(True)
    model.requires_grad_(False)
    trainable = [model.block_list()[-1], *model.post_block_modules()]
    for module in trainable:
        module.requires_grad_(True)
    model(_clip()).square().mean().backward()
    for module in trainable:
        for name, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in model.block_list()[0].parameters())


def test_block_lists():
    vmae, ircsn = _small("vmae", "tiny"), _small("csn", "tiny")
    assert vmae.block_list() == list(vmae.blocks) and vmae.post_block_modules() == [vmae.fc_norm]
    assert ircsn.block_list() == [ircsn.layer1[0], ircsn.layer2[0], ircsn.layer3[0], ircsn.layer4[0]]
    assert ircsn.post_block_modules() == []


def test_timm_layer_decay_is_monotone_by_block():
    model = _small("vmae", "tiny")
    assert model.no_weight_decay() == set()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    by_name = {n: scale[id(p)] for n, p in model.named_parameters()}
    order = ["patch_embed.proj.weight", *(f"blocks.{i}.attn.qkv.weight" for i in range(3)),
             "fc_norm.weight"]
    scales = [by_name[n] for n in order]
    assert scales == sorted(scales) and len(set(scales)) == len(scales) and scales[-1] == 1.0
    assert by_name["blocks.1.attn.q_bias"] == by_name["blocks.1.mlp.fc2.weight"] == scales[2]
    decay = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.blocks[0].attn.q_bias) not in decay and id(model.blocks[0].attn.qkv.weight) in decay
