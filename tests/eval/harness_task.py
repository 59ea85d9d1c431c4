"""A tiny local lm-eval task for the tests: needle prompts of kvx's shipped model in a JSONL file
and a task YAML beside it (no download)."""

import json

from kvx.eval import needle

TASK = "kvx_tiny_needle"
LENGTH = 192


def write_task(directory, tokenizer, docs: int = 3) -> None:
    """A generate_until task over needle prompts of the shipped model, its data a local JSONL file."""
    config = needle.NeedleConfig(lengths=[LENGTH], use_chat_template=False)
    rows = []
    for i in range(docs):
        prompt = needle.build_cell_prompt(config, tokenizer, needle.Cell(LENGTH, 20.0 + 30 * i, "single", i))
        rows.append({"prompt": tokenizer.decode(prompt.ids, skip_special_tokens=True),
                     "answer": " ".join(prompt.spec.expected[0])})  # the tokenizer spells digits apart
    (directory / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "task.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {directory / 'data.jsonl'}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: [" ."]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""")
