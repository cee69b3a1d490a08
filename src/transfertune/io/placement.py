"""Where models run and in which dtype, checked before anything loads: the library's, so the Python API and
every command place models the same way. Dtypes are spelt bf16 / fp16 / fp32 (or auto) everywhere."""
from __future__ import annotations

from transfertune.io.validate import InputError

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
DTYPE_CHOICES = ("auto", *DTYPES)


def check_device(text: str, flag: str = "device"):
    """The torch.device `text` names, if this machine has it; else an InputError naming the flag."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"{flag} {text!r} is not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if device.type in ("cpu",):
        return device
    if device.type == "meta":
        raise InputError(f"{flag} meta holds no data: give a device to compute on (cpu, cuda, ...)")
    backend = getattr(torch, device.type, None)
    if device.type == "mps":
        backend = torch.backends.mps
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise InputError(f"{flag} {text}: this machine (torch {torch.__version__}) has no {device.type} device")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise InputError(f"{flag} {text}: there {'is' if count == 1 else 'are'} only {count} {device.type} "
                         f"device{'s' if count != 1 else ''} (indices 0-{count - 1})")
    return device


def accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()) or \
        torch.backends.mps.is_available()


def resolve_dtype(choice: str, on_accelerator: bool):
    """A dtype choice as from_pretrained takes it: "auto" (the checkpoint's) on an accelerator, else fp32; a
    torch dtype is returned as it is."""
    import torch

    if isinstance(choice, torch.dtype):
        return choice
    if choice == "auto":
        return "auto" if on_accelerator else torch.float32
    if choice not in DTYPES:
        raise InputError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {choice!r}")
    return getattr(torch, DTYPES[choice])


def inference_placement(device: str | None = None, dtype: str = "auto", value_device: str | None = None,
                        device_map: str | None = None, flags: dict | None = None) -> dict:
    """device, value_device, device_map and dtype for ComposedModel.from_pretrained, checked. `flags` maps
    "device" / "value_device" to the names errors use (e.g. "--device")."""
    names = {"device": "device", "value_device": "value_device", **(flags or {})}
    if device is not None:
        device = check_device(device, names["device"])
    elif device_map and accelerator_available():
        import torch

        device = torch.device("cuda", 0) if torch.cuda.is_available() else check_device("mps", names["device"])
    else:
        device = check_device("cpu", names["device"])
    value_device = check_device(value_device, names["value_device"]) if value_device else device
    on_accelerator = device.type != "cpu" if not device_map else accelerator_available()
    return dict(device=device, value_device=value_device, device_map=device_map,
                dtype=resolve_dtype(dtype, on_accelerator))


def training_placement(dtype=None, device: str | None = None, flags: dict | None = None) -> dict:
    """How the value trainer places the frozen base: {"dtype": ... (for load_base, when not fp32),
    "training_args": {...} (use_cpu for device "cpu")}. The Trainer puts the models on the accelerator when there
    is one; a GPU is chosen with CUDA_VISIBLE_DEVICES, not an index."""
    import torch

    names = {"device": "device", **(flags or {})}
    training_args, on_accelerator = {}, accelerator_available()
    if device is not None:
        checked = check_device(str(device), names["device"])
        if checked.index is not None:
            raise InputError(f"{names['device']} {device}: training runs on the devices accelerate gives it; choose "
                             f"the GPU with CUDA_VISIBLE_DEVICES={checked.index} and {names['device']} "
                             f"{checked.type}")
        if checked.type == "cpu":
            training_args["use_cpu"], on_accelerator = True, False
    resolved = resolve_dtype(dtype if dtype is not None else "fp32", on_accelerator)
    return {"training_args": training_args, **({"dtype": resolved} if resolved != torch.float32 else {})}
