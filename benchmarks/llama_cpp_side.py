"""bench_infer.py's llama.cpp side, run by the Python that has llama-cpp-python (built from the
registry's source package; it is not a dependency of this project, so it has its own virtualenv).

Reads ``{"gguf", "prompts", "new_tokens", "threads"}`` as JSON on stdin; greedy-decodes every
prompt's token ids (one sequence at a time: llama-cpp-python's API), exactly ``new_tokens``
tokens each; prints ``RESULT {"seconds", "outputs"}``.
"""

import json
import sys
import time

import llama_cpp


def main() -> None:
    job = json.load(sys.stdin)
    llm = llama_cpp.Llama(job["gguf"], n_ctx=1024, n_threads=job["threads"], n_batch=512,
                          verbose=False)  # fmt: skip
    outputs, start = [], time.perf_counter()
    for prompt in job["prompts"]:
        llm.reset()
        row = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            row.append(token)
            if len(row) == job["new_tokens"]:
                break
        outputs.append(row)
    seconds = time.perf_counter() - start
    print("RESULT " + json.dumps({"seconds": seconds, "outputs": outputs}))


if __name__ == "__main__":
    main()
