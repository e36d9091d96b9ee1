"""Continual learning: one model trained through a sequence of domains, every domain's test
split scored before training and after each stage, and the forgetting that shows.

- `stream`: the domain sequence (training pools, scored splits tagged with their split, the
  retention text, the trunk's feature caches), the guards that refuse anything but the test
  split (validation only in a tuning run), and the seeded plan of stage blocks.
- `methods`: what a method is (a head, `model` overrides, EWC, replay, DER++, joint) and the
  baselines' machinery: the replay reservoir, EWC's Fisher and penalty, DER++'s stored logits.
- `loop`: `run_sequence`, the training through the stages, and the scoring of each row, the
  retention text and the layer diagnostics.
- `metrics`: ACC, BWT, FWT and forgetting over a result matrix, each with its sign
  convention; mean ± std over seeds and paired comparisons.
- `report`: the runs over seeds (means, paired comparisons, the verdict on the claim), the
  energy table, the report text, plots, manifest and model-card summary, and `write_outputs`.
"""

from hybridlm.continual.loop import (
    SCORES,
    check_checkpoint_tokenizer,
    evaluate_retention,
    evaluate_row,
    head_state,
    layer_diagnostics,
    run_sequence,
)
from hybridlm.continual.methods import (
    EWC,
    FIXED_MODEL_KEYS,
    NonFiniteStage,
    Reservoir,
    check_replay_sizes,
    method_model_config,
    replay_logits,
)
from hybridlm.continual.report import (
    aggregate,
    card_summary,
    make_plots,
    pm,
    stream_cache_info,
    verdict,
    write_outputs,
)
from hybridlm.continual.stream import (
    EVAL_SPLITS,
    PoolRows,
    Stream,
    TaggedBlocks,
    batches_per_stage,
    require_split,
    require_test,
    stage_blocks,
)

__all__ = [
    "EVAL_SPLITS",
    "EWC",
    "FIXED_MODEL_KEYS",
    "NonFiniteStage",
    "PoolRows",
    "Reservoir",
    "SCORES",
    "Stream",
    "TaggedBlocks",
    "aggregate",
    "batches_per_stage",
    "card_summary",
    "check_checkpoint_tokenizer",
    "check_replay_sizes",
    "evaluate_retention",
    "evaluate_row",
    "head_state",
    "layer_diagnostics",
    "make_plots",
    "method_model_config",
    "pm",
    "replay_logits",
    "require_split",
    "require_test",
    "run_sequence",
    "stage_blocks",
    "stream_cache_info",
    "verdict",
    "write_outputs",
]
