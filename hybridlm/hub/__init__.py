"""Model folders that Hugging Face clients accept: check, save, load, export, card, publish.

One job per module, all re-exported here (`from hybridlm import hub; hub.publish(...)`):

- `folder`: what a model folder holds; `check_model_folder` (the one validator: publishing
  and `load_model` call it first, and it names the file or field that is wrong),
  `save_model`, `load_model`, `full_state_dict` (a sharded model's whole weights);
- `remote_code`: `export_remote_code` writes a self-contained `modeling_hybridlm.py` (plain
  torch + transformers) and an `auto_map` into `config.json`, so people without hybridlm
  installed can load the folder with `trust_remote_code=True`;
- `card`: the model card (`README.md`), built only from measured metrics and the configs;
- `publishing`: `publish` uploads a checked folder to the Hub as one commit of only the
  files a model folder holds (`upload_plan`).

Importing `hybridlm` registers the classes with `AutoConfig` / `AutoModelForCausalLM`, so
`AutoModelForCausalLM.from_pretrained(folder)` works without remote code.
"""

from hybridlm.hub.card import (
    CONTINUAL_SUMMARY,
    HEADS,
    TAGS,
    add_continual_to_cards,
    card_data,
    card_text,
    check_card_run,
    claim_sentence,
    continual_method,
    continual_section,
    write_card_for_run,
    write_model_card,
)
from hybridlm.hub.folder import (
    CARD,
    CONFIG,
    MODEL_TYPE,
    WEIGHTS,
    WEIGHTS_INDEX,
    check_model_folder,
    expected_shapes,
    full_state_dict,
    load_model,
    save_model,
)
from hybridlm.hub.publishing import (
    MODEL_FILES,
    REPO_ID,
    PublishError,
    UploadPlan,
    check_repo_id,
    model_files,
    publish,
    upload_plan,
)
from hybridlm.hub.remote_code import AUTO_MAP, REMOTE_CODE, export_remote_code, modeling_source
from hybridlm.io import CheckpointError, safetensors_header

__all__ = [
    "AUTO_MAP",
    "CARD",
    "CONFIG",
    "CONTINUAL_SUMMARY",
    "HEADS",
    "MODEL_FILES",
    "MODEL_TYPE",
    "REMOTE_CODE",
    "REPO_ID",
    "TAGS",
    "WEIGHTS",
    "WEIGHTS_INDEX",
    "CheckpointError",
    "PublishError",
    "UploadPlan",
    "add_continual_to_cards",
    "card_data",
    "card_text",
    "check_card_run",
    "check_model_folder",
    "check_repo_id",
    "claim_sentence",
    "continual_method",
    "continual_section",
    "expected_shapes",
    "export_remote_code",
    "full_state_dict",
    "load_model",
    "model_files",
    "modeling_source",
    "publish",
    "safetensors_header",
    "save_model",
    "upload_plan",
    "write_card_for_run",
    "write_model_card",
]
