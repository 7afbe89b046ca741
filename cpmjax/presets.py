"""Model presets as HF config.json dicts (openbmb/MiniCPM4-8B config.json and the MiniCPM
README). Values marked [inferred] are not confirmed by a released config.json."""

from __future__ import annotations

from typing import Any

# MiniCPM4 32K LongRoPE factors (64 values, long == short). The spec lists the first 30 from the
# HF config excerpt; the full list comes from a public MiniCPM4-LM config.json (VoxCPM2 `lm_config`,
# same MiniCPM4 backbone), whose first 30 values match the spec's.
MINICPM4_32K_FACTORS = [
    0.9977997200264581, 1.014658295992452, 1.0349680404997148, 1.059429246056193,
    1.0888815016813513, 1.1243301355211495, 1.166977103606075, 1.2182568066927284,
    1.2798772354275727, 1.3538666751582975, 1.4426259039919596, 1.5489853358570191,
    1.6762658237220625, 1.8283407612492941, 2.0096956085876183, 2.225478927469756,
    2.481536379650452, 2.784415934557119, 3.1413289096347365, 3.560047844772632,
    4.048719380066383, 4.615569542115128, 5.2684819496549835, 6.014438591970396,
    6.858830049237097, 7.804668263503327, 8.851768731513417, 9.99600492938444,
    11.228766118181639, 12.536757560834843, 13.902257701387796, 15.303885189125953,
    16.717837610115794, 18.119465097853947, 19.484965238406907, 20.792956681060105,
    22.02571786985731, 23.16995406772833, 24.217054535738416, 25.16289275000465,
    26.007284207271347, 26.753240849586767, 27.40615325712662, 27.973003419175363,
    28.461674954469114, 28.880393889607006, 29.237306864684626, 29.540186419591297,
    29.79624387177199, 30.01202719065413, 30.193382037992453, 30.34545697551969,
    30.47273746338473, 30.579096895249787, 30.66785612408345, 30.741845563814174,
    30.80346599254902, 30.85474569563567, 30.897392663720595, 30.932841297560394,
    30.962293553185553, 30.986754758742034, 31.007064503249293, 31.02392307921529,
]

# MiniCPM4.1-8B factors for 131072 tokens (the MiniCPM README, MiniCPM4.1 section).
MINICPM41_FACTORS = [
    0.9982316082870437, 1.033048153422584, 1.0749920956484724, 1.1255096879436193,
    1.1863348602111476, 1.259543828902579, 1.3476188888731149, 1.4535223827776373,
    1.5807816745852985, 1.7335856049489526, 1.9168922912975785, 2.1365471404135326,
    2.3994084200118646, 2.713475511863602, 3.0880118452194134, 3.533650295140154,
    4.062463396503134, 4.687974098908333, 5.425075306704039, 6.289818967956352,
    7.29902962722721, 8.6357018163639, 10.210822723989212, 12.053807765671676,
    14.193944598909404, 16.65780676784363, 19.463620727694074, 22.628311203524586,
    26.150106147261315, 30.02526691405111, 34.23183327975347, 38.73811934094828,
    43.502489489729555, 48.47627117965394, 53.61139491762471, 58.857366522037935,
    64.16798299215064, 69.51359464319125, 74.86555458220285, 80.21497790341579,
    85.55322183307433, 90.89611806932027, 96.26245306514224, 101.68269304046481,
    107.18619510219668, 112.82253283014026, 118.63764063163615, 119.88866203644656,
    120.9462882391725, 121.837565139014, 122.58663780572562, 123.2147719894291,
    123.74049454862576, 124.17980424685767, 124.54641761955492, 124.85202548028222,
    125.10654406389756, 125.31835105170659, 125.49450117164764, 125.64091910903052,
    125.76256945356558, 125.86360463815589, 125.94749252260765, 126.01712561287873,
]

# MiniCPM4-8B's 128K ("YaRN") factors, 64 values (CPM.cu examples/minicpm4/config.py,
# get_minicpm4_yarn_factors / apply_minicpm4_yarn_config, which swaps them in for long_factor and
# short_factor; the MiniCPM4-8B model card gives the same list for contexts past 32K).
MINICPM4_128K_FACTORS = MINICPM4_32K_FACTORS[:21] + [  # the first 21 are the 32K list's
    4.752651957515948, 5.590913044973868, 6.584005926629993,
    7.7532214876576155, 9.119754865903639, 10.704443927019176, 12.524994176518703,
    14.59739595363613, 16.93214476166354, 19.53823297353041, 22.417131025031697,
    25.568260840911098, 28.991144156566317, 32.68408069090375, 36.65174474170465,
    40.90396065611201, 45.4664008671033, 50.37147343433591, 55.6804490772103,
    61.470816952306556, 67.8622707390618, 75.00516023410414, 83.11898235973767,
    92.50044360202462, 103.57086856690864, 116.9492274587385, 118.16074567836519,
    119.18497548708795, 120.04810876261652, 120.77352815196981, 121.38182790207875,
    121.89094985353891, 122.31638758099915, 122.6714244963338, 122.9673822552567,
    123.21386397019609, 123.41898278254268, 123.58957065488238, 123.73136519024158,
    123.84917421274221, 123.94701903496814, 124.02825801299717, 124.09569231686116,
]

MINICPM4_SPARSE = {"kernel_size": 32, "kernel_stride": 16, "init_blocks": 1, "block_size": 64,
                   "window_size": 2048, "topk": 64, "use_nope": False, "dense_len": 8192}

_COMMON: dict[str, Any] = {
    "model_type": "minicpm",
    "architectures": ["MiniCPMForCausalLM"],
    "vocab_size": 73448,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,  # [?] MiniCPM-family default
    "scale_emb": 12,
    "dim_model_base": 256,
    "scale_depth": 1.4,
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": [2, 73440],
    "pad_token_id": 2,
    "torch_dtype": "bfloat16",
}


def _longrope(factors: list[float], original: int) -> dict[str, Any]:
    return {"rope_type": "longrope", "long_factor": list(factors), "short_factor": list(factors),
            "original_max_position_embeddings": original}


def minicpm4_8b() -> dict[str, Any]:
    """MiniCPM4-8B [HFCFG]; sparse_config as the README gives it (off unless added)."""
    return {**_COMMON, "hidden_size": 4096, "intermediate_size": 16384, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "tie_word_embeddings": False,
            "rope_scaling": _longrope(MINICPM4_32K_FACTORS, 32768),
            "sparse_config": dict(MINICPM4_SPARSE)}


def minicpm4_0p5b() -> dict[str, Any]:
    """MiniCPM4-0.5B: d, L, heads, KV, intermediate and tying are [inferred] from the parameter
    count; head_dim 64 so 32 LongRoPE factors [inferred: first 32 of the 8B list]."""
    return {**_COMMON, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "num_key_value_heads": 2,
            "max_position_embeddings": 32768, "tie_word_embeddings": True,
            "rope_scaling": _longrope(MINICPM4_32K_FACTORS[:32], 32768)}


def minicpm41_8b() -> dict[str, Any]:
    """MiniCPM4.1-8B: 8B shapes [inferred], 64K native, README LongRoPE factors to 131072."""
    return {**minicpm4_8b(), "max_position_embeddings": 65536,
            "rope_scaling": _longrope(MINICPM41_FACTORS, 65536)}


def _context_128k(preset: dict[str, Any], factors: list[float]) -> dict[str, Any]:
    """A preset run at 131072 tokens with ``factors``, as CPM.cu does it: the factor lists
    swapped (``original_max_position_embeddings`` kept) and no LongRoPE attention scaling
    (CPM.cu ignores it; with max_position_embeddings 32768, as the model card leaves it, HF's
    code computes 1 too). max_position_embeddings says 131072 so the engine accepts the length,
    and ``attention_factor: 1.0`` keeps the scaling at 1 with it."""
    original = preset["rope_scaling"]["original_max_position_embeddings"]
    return {**preset, "max_position_embeddings": 131072,
            "rope_scaling": {**_longrope(factors, original), "attention_factor": 1.0}}


def minicpm4_8b_128k() -> dict[str, Any]:
    """MiniCPM4-8B with its 128K YaRN factors (sparse_config on, as for 128K inference)."""
    return _context_128k(minicpm4_8b(), MINICPM4_128K_FACTORS)


def minicpm41_8b_128k() -> dict[str, Any]:
    """MiniCPM4.1-8B at 131072 tokens with the README's factor list (original 65536)."""
    return _context_128k(minicpm41_8b(), MINICPM41_FACTORS)


def tiny() -> dict[str, Any]:
    """A MiniCPM-shaped model that trains in minutes on a laptop CPU (vocab of the project's own
    4096-token tokenizer; scales kept non-trivial so every muP site is exercised)."""
    return {**_COMMON, "vocab_size": 4096, "hidden_size": 128, "intermediate_size": 384,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "dim_model_base": 64, "tie_word_embeddings": True,
            "eos_token_id": 2, "torch_dtype": "float32"}


def small() -> dict[str, Any]:
    """~20M-parameter model for CPU benchmarks."""
    return {**tiny(), "hidden_size": 512, "intermediate_size": 1280, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2, "dim_model_base": 64}


PRESETS = {"tiny": tiny, "small": small, "minicpm4_0p5b": minicpm4_0p5b,
           "minicpm4_8b": minicpm4_8b, "minicpm41_8b": minicpm41_8b,
           "minicpm4_8b_128k": minicpm4_8b_128k, "minicpm41_8b_128k": minicpm41_8b_128k}


def model_config(name: str, sparse: str = "preset", dense_len: int | None = None) -> Any:
    """The ``ModelConfig`` of preset ``name`` with InfLLM v2 as the preset has it
    (``sparse="preset"``), switched on with MiniCPM4's sparse_config (``"on"``) or off
    (``"off"``); ``dense_len`` overrides the sparse switch length."""
    from cpmjax.config import ModelConfig

    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    if sparse not in ("preset", "on", "off"):
        raise ValueError(f"sparse must be 'preset', 'on' or 'off', got {sparse!r}")
    hf = PRESETS[name]()
    if sparse == "on":
        hf["sparse_config"] = {**MINICPM4_SPARSE, **hf.get("sparse_config", {})}
    elif sparse == "off":
        hf.pop("sparse_config", None)
    if dense_len is not None:
        if "sparse_config" not in hf:
            raise ValueError("dense_len needs sparse_config (sparse='on' or a sparse preset)")
        hf["sparse_config"] = {**hf["sparse_config"], "dense_len": dense_len}
    return ModelConfig.from_hf_config(hf)
