# %% [markdown]
# # xtuner_lite from a notebook
# Each `# %%` block is a notebook cell (Jupyter, VS Code): the CLI is one import away.

# %%
from xtuner_lite import load_config, train
from xtuner_lite.commands.chat import ChatSession, GenerationOptions

# %% Load the quickstart config and override fields, as `--cfg-options` would.
cfg = load_config("smollm2_135m_identity_lora")
cfg.train["max_iters"] = 30  # set lower for a quick look
print(cfg.model, cfg.train_dataset, sep="\n")

# %% Train; the adapter folder comes back.
adapter = train(cfg, work_dir="work_dirs/notebook")
print("adapter saved in", adapter)

# %% Ask the fine-tuned model who it is.
chat = ChatSession(
    "smollm2-135m-instruct", adapter=str(adapter), options=GenerationOptions(max_new_tokens=40)
)
print(chat.ask("Who are you?"))
