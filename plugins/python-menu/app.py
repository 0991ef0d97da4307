"""IVR menu in Python: plays a menu prompt, collects one key with retries and routes the call.

The Python twin of the Rust stock flow `plugins/ivr-menu`, built into a component of the
`patchbay:voice/flow` world with componentize-py. Routing comes from call variables (set by
the tenant's routing config):

| variable              | meaning                                            | default            |
| --------------------- | -------------------------------------------------- | ------------------ |
| `menu.prompt`         | the menu prompt                                    | `menu.wav`         |
| `menu.invalid-prompt` | played after a key with no route                   | `invalid.wav`      |
| `menu.retries`        | extra attempts after no input or a bad key         | `2`                |
| `menu.timeout-ms`     | time for a key after the prompt                    | `5000`             |
| `menu.<key>`          | `dial:<sip-uri>`, `agent:<ws-url>` or `hangup`     | see DEFAULT_ROUTES |

How the WIT maps to Python (componentize-py bindings, module `wit_world`):

* `borrow<call>` arrives as a `Call` object that is only valid during `run`; the flow must not
  keep it or drop it (no `with call:`), since the host owns the call.
* A `result<T, E>` return becomes a plain return of `T`; the error case is raised as the
  exception `componentize_py_types.Err` with the WIT error in `.value`. `run` reports its own
  failure the same way, by raising `Err(FlowError_...)`.
* A `variant` is a union of dataclasses named `<Variant>_<Case>` (payload in `.value`), an
  `enum` is a Python `Enum`, a `char` is a one-character `str`, an `option<T>` is `T | None`.
"""

import re
from dataclasses import dataclass
from typing import Optional

import wit_world
from componentize_py_types import Err
from wit_world.imports import log
from wit_world.imports.call import (
    AgentEnd_TransferRequested,
    Call,
    CollectOptions,
    DialOptions,
    HangupCause_Normal,
    PlayOptions,
    PlayOutcome_Completed,
    PlayOutcome_Interrupted,
)
from wit_world.imports.types import FlowError_Call, FlowError_Failed

# Routes used when the call has no `menu.<key>` variables.
DEFAULT_ROUTES = {
    "1": "dial:sip:sales@127.0.0.1",
    "2": "agent:ws://127.0.0.1:8765/agent",
    "0": "hangup",
}

# The keys a menu can route, in the order they are checked.
MENU_KEYS = "0123456789*#"

# How long a dialed destination may ring.
DIAL_TIMEOUT_MS = 30_000

# A decimal `u32` as Rust's `str::parse::<u32>` accepts it: ASCII digits, optionally after `+`.
_U32 = re.compile(r"\+?[0-9]+")
_U32_MAX = 0xFFFF_FFFF


# --- SDK-style helpers (the Python counterparts of `patchbay_plugin_sdk`) -------------------


def info(message: str) -> None:
    """Writes a line to Patchbay's log, tagged with the call and tenant."""
    log.log(log.Level.INFO, message)


def warn(message: str) -> None:
    """Writes a warning to Patchbay's log."""
    log.log(log.Level.WARN, message)


def play_barge_in() -> PlayOptions:
    """Play once; a key press interrupts the prompt."""
    return PlayOptions(barge_in=True, repeat=1)


def play_uninterruptible() -> PlayOptions:
    """Play once, ignoring key presses."""
    return PlayOptions(barge_in=False, repeat=1)


def ringing_for(timeout_ms: int) -> DialOptions:
    """Ring for `timeout_ms`, with the tenant's default caller ID and no extra headers."""
    return DialOptions(caller_id=None, timeout_ms=timeout_ms, headers=[])


@dataclass
class MenuOptions:
    """Options for `menu` (the defaults are those of the SDK's `MenuOptions::new`)."""

    # The menu prompt, played with barge-in.
    prompt: str
    # The keys that are valid choices.
    valid: str = "0123456789"
    # How many times to ask again after no input or an invalid key.
    retries: int = 2
    # Played after an invalid key (None: just ask again).
    invalid_prompt: Optional[str] = None
    # Played when nobody pressed anything (None: just ask again).
    timeout_prompt: Optional[str] = None
    # Time to wait for a key after the prompt.
    timeout_ms: int = 5_000


def menu(call: Call, options: MenuOptions) -> Optional[str]:
    """Plays a menu and returns the caller's choice: a key from `options.valid`, or None when
    the retries ran out. A key pressed during the prompt counts at once (barge-in).

    Call errors propagate as `Err(CallError)`, like `?` in the Rust SDK.
    """
    for _attempt in range(options.retries + 1):
        outcome = call.play(options.prompt, play_barge_in())
        match outcome:
            case PlayOutcome_Interrupted(value=pressed):
                key: Optional[str] = pressed
            case PlayOutcome_Completed():
                collected = call.collect_digits(
                    CollectOptions(
                        max_digits=1,
                        terminators="",
                        first_digit_timeout_ms=options.timeout_ms,
                        inter_digit_timeout_ms=3_000,
                        prompt=None,
                        barge_in=True,
                    )
                )
                key = collected.digits[0] if collected.digits else None
        if key is not None and key in options.valid:
            return key
        reprompt = options.invalid_prompt if key is not None else options.timeout_prompt
        if reprompt is not None:
            call.play(reprompt, play_uninterruptible())
    return None


# --- The flow ------------------------------------------------------------------------------


def parse_u32(text: str) -> Optional[int]:
    """Parses a call variable as Rust's `u32` would; None when it is not one."""
    if _U32.fullmatch(text) is None:
        return None
    value = int(text)
    return value if value <= _U32_MAX else None


def var_or(call: Call, name: str, default: int) -> int:
    """A numeric call variable, or `default` when it is absent or not a valid `u32`."""
    value = call.get_var(name)
    parsed = parse_u32(value) if value is not None else None
    return default if parsed is None else parsed


def route(call: Call, key: str) -> Optional[str]:
    """The route for a key: the `menu.<key>` variable, else the default route, else None.

    A variable that is set (even to an empty string) wins over the default.
    """
    spec = call.get_var(f"menu.{key}")
    return spec if spec is not None else DEFAULT_ROUTES.get(key)


def parse_action(spec: str) -> Optional[tuple[str, str]]:
    """Splits a route into `("dial", uri)`, `("agent", url)` or `("hangup", "")`; None when the
    route is none of those."""
    kind, colon, target = spec.partition(":")
    if colon and kind in ("dial", "agent") and target:
        return kind, target
    if not colon and spec == "hangup":
        return "hangup", ""
    return None


_RUN = re.compile(r"[A-Za-z0-9+._~-]*")


def listed(patterns: str, target: str) -> bool:
    """Whether `target` (sent by the agent, so from the network) is one of the comma-separated
    `patterns`; `*` stands for a run of letters, digits and `+-._~` (as the Rust SDK's `target_listed`)."""
    for pattern in (p.strip() for p in patterns.split(",")):
        if pattern and re.fullmatch(_RUN.pattern.join(map(re.escape, pattern.split("*"))), target, re.ASCII):
            return True
    return False


def debug_str(text: str) -> str:
    """Quotes a string the way Rust's `{:?}` does, so log lines and CDR messages read the same
    as those of `ivr-menu`."""
    escapes = {"\t": "\\t", "\r": "\\r", "\n": "\\n", "\\": "\\\\", '"': '\\"', "\0": "\\0"}
    out = []
    for ch in text:
        if ch in escapes:
            out.append(escapes[ch])
        elif ch.isprintable():
            out.append(ch)
        else:
            out.append(f"\\u{{{ord(ch):x}}}")
    return '"' + "".join(out) + '"'


def run_menu(call: Call) -> None:
    """The flow's logic. Call errors escape as `Err(CallError)`; a bad route raises
    `Err(FlowError)` directly."""
    call.answer()
    prompt = call.get_var("menu.prompt")
    invalid = call.get_var("menu.invalid-prompt")
    options = MenuOptions(
        prompt="menu.wav" if prompt is None else prompt,
        valid="".join(k for k in MENU_KEYS if route(call, k) is not None),
        retries=var_or(call, "menu.retries", 2),
        invalid_prompt="invalid.wav" if invalid is None else invalid,
        timeout_ms=var_or(call, "menu.timeout-ms", 5_000),
    )
    key = menu(call, options)
    if key is None:
        info("python-menu: no choice after retries, hanging up")
        call.hangup(HangupCause_Normal())
        return

    # As ivr-menu: the choice made, for the CDR.
    call.set_var("menu.path", f"main:{key}")
    spec = route(call, key) or ""
    match parse_action(spec):
        case ("dial", uri):
            info(f"python-menu: key {key} -> dial {uri}")
            call.dial(uri, ringing_for(DIAL_TIMEOUT_MS))
        case ("agent", url):
            info(f"python-menu: key {key} -> agent {url}")
            match call.agent(url, []):
                case AgentEnd_TransferRequested(value=target) if not listed(
                    call.get_var("menu.transfer-targets") or "", target
                ):
                    warn(f"python-menu: transfer to {target} refused: not in menu.transfer-targets")
                    call.set_var("menu.transfer-refused", "not in menu.transfer-targets")
                case AgentEnd_TransferRequested(value=target):
                    call.transfer(target)
                case _:
                    pass
        case ("hangup", _):
            call.hangup(HangupCause_Normal())
        case _:
            warn(f"python-menu: route {debug_str(spec)} for key {key} is not dial:, agent: or hangup")
            raise Err(FlowError_Failed(f"bad route for key {key}: {debug_str(spec)}"))


class WitWorld(wit_world.WitWorld):
    """The component's export: `run: func(call: borrow<call>) -> result<_, flow-error>`."""

    def run(self, call: Call) -> None:
        try:
            run_menu(call)
        except Err as error:
            # A call operation failed: wrap its `call-error` as `flow-error.call`, as `?` does
            # through `From<CallError> for FlowError` in Rust. A `flow-error` passes through.
            if isinstance(error.value, (FlowError_Call, FlowError_Failed)):
                raise
            raise Err(FlowError_Call(error.value)) from None
