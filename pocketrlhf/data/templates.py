"""Prompt formats, shared by training (SFT, RM, PPO, DPO) and inference (chat, serve).

Training and inference render conversations through the same code, so the end-of-turn the
model learns is the one chat/serve stop on (the most common failure of fine-tunes in the field:
replies that never stop). Every training completion also ends with the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Literal, get_args

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}
TemplateName = Literal["plain", "auto", "stackllama", "chatml", "vicuna", "llama-2"]


@dataclass(frozen=True)
class ChatFormat:
    """A named prompt format. ``auto`` means the tokenizer's own chat template (ChatML without one)."""

    name: str
    system: str = "{system}\n\n"
    user: str = "{content}"
    assistant: str = "{content}"  # a finished assistant turn (before EOS)
    generation_prompt: str = ""  # opens the assistant turn to generate into
    end_of_turn: str = ""  # closes an assistant turn, before EOS
    stop: tuple[str, ...] = ()  # extra stop strings for inference
    default_system: str = ""


FORMATS: dict[str, ChatFormat] = {
    "plain": ChatFormat("plain", system="{system}\n\n", user="{content}", assistant="{content}"),
    # StackLLaMA: "Question: <q>\n\nAnswer: <a>" for SFT, RM and RL alike.
    "stackllama": ChatFormat(
        "stackllama", system="{system}\n\n", user="Question: {content}\n\n", assistant="Answer: {content}\n\n",
        generation_prompt="Answer: ", stop=("\n\nQuestion:",),
    ),
    "chatml": ChatFormat(
        "chatml", system="<|im_start|>system\n{system}<|im_end|>\n", user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant="<|im_start|>assistant\n{content}<|im_end|>\n", generation_prompt="<|im_start|>assistant\n",
        end_of_turn="<|im_end|>", stop=("<|im_end|>",),
    ),
    "vicuna": ChatFormat(
        "vicuna", system="{system} ", user="USER: {content} ", assistant="ASSISTANT: {content}</s>",
        generation_prompt="ASSISTANT:", end_of_turn="</s>", stop=("</s>", "USER:"),
        default_system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    ),
    "llama-2": ChatFormat(
        "llama-2", system="<<SYS>>\n{system}\n<</SYS>>\n\n", user="[INST] {content} [/INST]",
        assistant=" {content} </s>", generation_prompt="", end_of_turn=" </s>", stop=("</s>", "[INST]"),
    ),
}
FORMAT_NAMES = get_args(TemplateName)
assert set(FORMAT_NAMES) == {"auto", *FORMATS}


def _render_builtin(fmt: ChatFormat, messages: list[Message], add_generation_prompt: bool) -> str:
    parts = []
    system = next((m["content"] for m in messages if m["role"] == "system"), fmt.default_system)
    turns = [m for m in messages if m["role"] != "system"]
    for i, m in enumerate(turns):
        role = m["role"]
        if role == "user":
            text = fmt.user.format(content=m["content"])
            if fmt.name == "llama-2" and i == 0 and system:
                # Llama-2 puts the system block inside the first [INST].
                text = "[INST] " + fmt.system.format(system=system) + m["content"] + " [/INST]"
            parts.append(text)
        elif role == "assistant":
            parts.append(fmt.assistant.format(content=m["content"]))
        else:
            raise ValueError(f"unknown role '{role}' (system, user or assistant)")
    prefix = fmt.system.format(system=system) if system and fmt.name != "llama-2" else ""
    text = prefix + "".join(parts)
    if add_generation_prompt:
        text += fmt.generation_prompt
    return text


def render(messages: list[Message], fmt: str = "auto", tokenizer=None, add_generation_prompt: bool = False) -> str:
    """The conversation as text. ``auto`` uses the tokenizer's chat template, else ChatML."""
    if fmt == "auto":
        if tokenizer is not None and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        fmt = "chatml"
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format '{fmt}' (one of {', '.join(FORMAT_NAMES)})")
    return _render_builtin(FORMATS[fmt], messages, add_generation_prompt)


# What an encoder-decoder base can take: its input text goes to the encoder as it is written, its
# target to the decoder. Chat formats (auto, chatml, vicuna, llama-2) are decoder-only conventions:
# a T5 tokenizer has no chat template, nor ChatML's tokens.
SEQ2SEQ_TEMPLATES = ("plain", "stackllama")


def check_seq2seq_template(template: str) -> None:
    """A one-line error for a prompt format an encoder-decoder base cannot use."""
    from pocketrlhf.errors import ConfigError

    if template not in SEQ2SEQ_TEMPLATES:
        raise ConfigError(f"prompt format '{template}' needs a decoder-only chat template; an encoder-decoder base takes "
                          "--template plain or stackllama (the input text goes to the encoder, the answer is the "
                          "decoder's target)")


def prompt_text(prompt: str, fmt: str = "plain", tokenizer=None) -> str:
    """A single user prompt, opened for the answer (``Question: q\\n\\nAnswer: `` for stackllama)."""
    if fmt == "plain":
        return prompt
    return render([{"role": "user", "content": prompt}], fmt, tokenizer, add_generation_prompt=True)


def completion_text(completion: str, fmt: str = "plain", tokenizer=None) -> str:
    """What follows ``prompt_text`` for a finished answer (without the EOS token)."""
    if fmt == "plain":
        return completion
    if fmt == "auto" and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": "\x00"}]
        head = render(msgs, fmt, tokenizer, add_generation_prompt=True)
        full = render(msgs + [{"role": "assistant", "content": completion}], fmt, tokenizer)
        if not full.startswith(head):
            raise ValueError("the tokenizer's chat template renders an answer that does not extend its own prompt")
        return full[len(head):].rstrip("\n")
    spec = FORMATS["chatml" if fmt == "auto" else fmt]
    if spec.name == "stackllama":
        return completion
    if spec.name == "vicuna":
        return " " + completion + spec.end_of_turn
    if spec.name == "llama-2":
        return " " + completion + spec.end_of_turn
    return completion + spec.end_of_turn


def seq2seq_format(fmt: str, tokenizer=None) -> str:
    """The format an encoder-decoder's (T5, BART) input is rendered in. Such a base has no chat
    template of its own (flan-t5 reads instructions as they are): ``auto`` is the tokenizer's chat
    template when it has one, else ``plain``, not ChatML; named formats render as for a causal LM
    and the reply is the decoder's target."""
    if fmt == "auto" and not (tokenizer is not None and getattr(tokenizer, "chat_template", None)):
        return "plain"
    return fmt


def stop_strings(fmt: str = "auto", tokenizer=None) -> tuple[str, ...]:
    if fmt == "auto" and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        template = tokenizer.chat_template
        return tuple(s for s in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "</s>") if s in template)
    return FORMATS["chatml" if fmt == "auto" else fmt].stop
