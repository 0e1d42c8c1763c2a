"""``pocketrlhf pipeline run.yaml``: data preparation -> SFT -> reward model -> PPO, GRPO and/or
DPO -> evaluation, in one run directory, every stage on the same frozen base (never merged, never
copied: each stage loads it as given and trains adapters on it).

Re-running the same command skips finished stages (those with a summary.json) and resumes an
interrupted one from its latest checkpoint. Example::

    output_dir: runs/stackllama
    model: models/llama-7b
    quantization: 4bit
    template: stackllama
    stackexchange: dumps/Posts.xml.bz2   # optional: raw data to prepare first
    stages: [data, sft, rm, ppo, eval]
    sft: {max_steps: 2000, seq_length: 1024}
    rm: {max_steps: 1000}
    ppo: {max_steps: 500, max_new_tokens: 128}
    evaluation: {samples: 128}

Stage sections take the options of the matching command (``pocketrlhf sft --help`` ...); the
top-level model, precision, template and seed apply to every stage.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Literal

from pocketrlhf.config import ModelOptions, check_paths, from_dict, option, save_config
from pocketrlhf.data.templates import TemplateName
from pocketrlhf.errors import ConfigError
from pocketrlhf.logs import log, setup_logging
from pocketrlhf.paths import missing_model_message

STAGES = ("data", "sft", "rm", "ppo", "grpo", "dpo", "eval")
POLICY_STAGES = ("ppo", "grpo", "dpo")  # the policies the evaluation compares
SHARED = ("model", "quantization", "quant_type", "double_quant", "compute_dtype", "dtype", "device",
          "trust_remote_code", "template", "seed", "progress", "adapter_scope")
# Checkpoint cadence when a stage section sets none, so an interrupted pipeline can resume.
DEFAULT_SAVE_STEPS = {"sft": 100, "rm": 100, "dpo": 100, "ppo": 10, "grpo": 10}


@dataclasses.dataclass
class PipelineConfig(ModelOptions):
    output_dir: str = option("runs/pipeline", "one folder for every stage's run, the data and the evaluation")
    template: TemplateName = option("plain", "prompt format of every stage (stackllama for Stack Exchange data)")
    seed: int = option(0, "seed of every stage")
    adapter_scope: Literal["all", "decoder"] = option(
        "all", "encoder-decoder bases: every stage's adapters on encoder and decoder (all) or the decoder only "
        "(decoder: PPO's and DPO's roles then share one encoder pass)")
    progress: bool = option(True, "progress bars")
    stages: list[str] = option(["sft", "rm", "ppo", "eval"], f"stages to run, in order: any of {', '.join(STAGES)}")
    stackexchange: str = option("", "raw Stack Exchange data for the data stage (Posts.xml[.gz|.bz2|.7z] or paired data)")
    data: dict = option({}, "options of `pocketrlhf data stackexchange`")
    sft: dict = option({}, "options of `pocketrlhf sft` (data, max_steps, ...)")
    rm: dict = option({}, "options of `pocketrlhf rm`")
    ppo: dict = option({}, "options of `pocketrlhf ppo`")
    grpo: dict = option({}, "options of `pocketrlhf grpo` (reward_function: rule rewards; without one, the rm stage's "
                            "reward adapter)")
    dpo: dict = option({}, "options of `pocketrlhf dpo`")
    evaluation: dict = option({}, "evaluation options: prompts, samples, max_new_tokens, reward_function, ...")


def _check_stages(cfg: PipelineConfig) -> None:
    unknown = [s for s in cfg.stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage '{unknown[0]}' (stages are {', '.join(STAGES)})")
    if "data" in cfg.stages and not cfg.stackexchange:
        raise ConfigError("the data stage needs `stackexchange:` (a Posts.xml dump or an already-paired dataset)")


def _done(stage_dir: Path) -> bool:
    return (stage_dir / "summary.json").is_file()


def stage_config(cls, cfg: PipelineConfig, section: str, values: dict, wiring: dict, source: str):
    """A stage's typed config: shared top-level options < wiring between stages < its section."""
    fields = {f.name for f in dataclasses.fields(cls)}
    merged = {k: getattr(cfg, k) for k in SHARED if k in fields}
    merged.update({k: v for k, v in wiring.items() if k in fields})
    merged.update(values)
    # Wired paths are outputs of earlier stages, absent until they run: Pipeline checks the user's.
    return from_dict(cls, merged, source=f"{source}: {section}", check_paths=False)


class Pipeline:
    def __init__(self, cfg: PipelineConfig, source: str | None = None):
        source = source or getattr(cfg, "_config_file", "pipeline")
        _check_stages(cfg)
        if not cfg.model:
            raise ConfigError(f"{source}: `model:` (the base model directory) is required")
        problem = missing_model_message(cfg.model)
        if problem:
            raise ConfigError(f"{source}: model {problem}")
        self.cfg, self.source = cfg, source
        self.root = Path(cfg.output_dir)
        for stage in cfg.stages:  # every section checked now, not hours later when its stage starts
            stage_cfg = self.stage_config(stage)
            section = {"eval": "evaluation"}.get(stage, stage)
            check_paths(stage_cfg, lambda name, section=section: f"{source}: {section}: {name}",
                        [f.name for f in dataclasses.fields(stage_cfg) if not self._produced(getattr(stage_cfg, f.name))])

    def _produced(self, value) -> bool:
        """A path inside the pipeline's folder, which its own stages write (or an option that is no path)."""
        if not isinstance(value, str) or not value:
            return True
        root = self.root.expanduser().resolve()
        return Path(value).expanduser().resolve().is_relative_to(root)

    def dir(self, stage: str) -> Path:
        return self.root / {"eval": "evaluation"}.get(stage, stage)

    def prepared(self, split: str) -> str:
        return str(self.root / "data" / split) if "data" in self.cfg.stages else ""

    def _training_stage(self, stage: str, cls, wiring: dict) -> object:
        values = dict(getattr(self.cfg, stage))
        values.setdefault("save_steps", DEFAULT_SAVE_STEPS[stage])
        stage_cfg = stage_config(cls, self.cfg, stage, values, {"output_dir": str(self.dir(stage)), **wiring},
                                 self.source)
        if stage_cfg.template != self.cfg.template:
            log.warning("%s uses template %s but the pipeline's is %s: every stage should see the same prompt format",
                        stage, stage_cfg.template, self.cfg.template)
        if self.dir(stage).is_dir():
            stage_cfg.resume = stage_cfg.resume or "auto"
        return stage_cfg

    def adapter(self, stage: str) -> str:
        return str(self.dir(stage) / "adapter") if stage in self.cfg.stages else ""

    def stage_config(self, stage: str):
        """The typed config of ``stage``, wired to the outputs of the stages before it."""
        from pocketrlhf.evaluate import EvaluationConfig
        from pocketrlhf.models.loading import is_seq2seq
        from pocketrlhf.stages import dpo, grpo, ppo, rm, sft

        sft_adapter = self.adapter("sft")
        # Held-out numbers of every stage come from the prepared evaluation split: questions that no
        # training split holds (a random share of a stage's own rows would share questions with it).
        held_out = self.prepared("evaluation")
        manifest = self.root / "data" / "manifest.json"
        no_split = self.cfg.data.get("evaluation_fraction") == 0 or (
            manifest.is_file() and not json.loads(manifest.read_text()).get("splits", {}).get("evaluation"))
        if held_out and no_split:  # an empty split: each stage holds out eval_fraction of its own prompts
            held_out = ""
        if stage == "data":
            from pocketrlhf.data import stackexchange

            values = {"input": self.cfg.stackexchange, "output_dir": str(self.dir("data")), "seed": self.cfg.seed,
                      "progress": self.cfg.progress, "overwrite": True, **self.cfg.data}
            return from_dict(stackexchange.StackExchangeConfig, values, f"{self.source}: data")
        if stage == "sft":
            wiring = {"data": self.prepared("finetune"), "eval_data": held_out}
            if is_seq2seq(self.cfg.model):  # packing has no meaning there (sft refuses it when asked for)
                log.info("encoder-decoder base: sft runs without packing (input -> target examples)")
                wiring["packing"] = False
            return self._training_stage("sft", sft.SFTConfig, wiring)
        if stage == "rm":
            return self._training_stage("rm", rm.RMConfig, {"data": self.prepared("reward"), "eval_data": held_out,
                                                            "sft_adapter": sft_adapter})
        if stage == "ppo":
            wiring = {"prompts": self.prepared("rl"), "eval_prompts": held_out, "sft_adapter": sft_adapter}
            if "reward_function" not in self.cfg.ppo:
                wiring["reward_adapter"] = self.adapter("rm")
            return self._training_stage("ppo", ppo.PPOConfig, wiring)
        if stage == "grpo":
            wiring = {"prompts": self.prepared("rl"), "eval_prompts": held_out, "sft_adapter": sft_adapter}
            if not self.cfg.grpo.get("reward_function") and "rm" in self.cfg.stages:
                wiring["reward_adapter"] = self.adapter("rm")
            return self._training_stage("grpo", grpo.GRPOConfig, wiring)
        if stage == "dpo":
            data = self.cfg.rm.get("data", "") or self.prepared("reward")
            eval_data = self.cfg.rm.get("eval_data", "") or held_out
            return self._training_stage("dpo", dpo.DPOConfig, {"data": data, "eval_data": eval_data,
                                                              "sft_adapter": sft_adapter})
        policies = {s: self.adapter(s) for s in POLICY_STAGES if s in self.cfg.stages}
        wiring = {"output_dir": str(self.dir("eval")), "sft_adapter": sft_adapter, "policies": policies,
                  "reward_adapter": self.adapter("rm"),
                  "prompts": self.prepared("evaluation") or self.cfg.ppo.get("prompts", "")}
        return stage_config(EvaluationConfig, self.cfg, "evaluation", dict(self.cfg.evaluation), wiring, self.source)

    def run_stage(self, stage: str) -> dict:
        from pocketrlhf.data import stackexchange
        from pocketrlhf.evaluate import evaluate
        from pocketrlhf.stages import dpo, grpo, ppo, rm, sft

        run = {"data": stackexchange.run, "sft": sft.train, "rm": rm.train, "ppo": ppo.train, "grpo": grpo.train,
               "dpo": dpo.train, "eval": evaluate}[stage]
        result = run(self.stage_config(stage))
        if stage == "eval":
            (self.dir("eval") / "summary.json").write_text(json.dumps(result, indent=2))
        return result

    def run(self) -> dict:
        from pocketrlhf.report import write_report

        setup_logging()
        self.root.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.root / "pipeline.yaml")
        results = {}
        for stage in self.cfg.stages:
            if _done(self.dir(stage)) or (stage == "data" and (self.dir("data") / "manifest.json").is_file()):
                log.info("pipeline: %s already finished in %s, skipping", stage, self.dir(stage))
                summary = self.dir(stage) / "summary.json"
                results[stage] = json.loads(summary.read_text()) if summary.is_file() else {}
                continue
            log.info("pipeline: stage %s -> %s", stage, self.dir(stage))
            started = time.time()
            results[stage] = self.run_stage(stage)
            log.info("pipeline: %s finished in %.0f s", stage, time.time() - started)
        write_report(self.root)
        return results


def run(cfg: PipelineConfig) -> dict:
    results = Pipeline(cfg).run()
    print(f"pipeline finished: {cfg.output_dir} (report: {Path(cfg.output_dir) / 'report.md'})")
    return results
