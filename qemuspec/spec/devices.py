"""Options that are one qemu device, declared once on the model's field and read from there.

A field written ``Annotated[DeviceOption | None, ..., QemuDevice(...)]`` in spec/models.py is `true`
or a table of the device's extra properties in a definition. Every layer reads the declaration
instead of knowing the field: the renderer writes ``-device DRIVER,id=qemuspec-ID``; the libvirt
export writes the element (and tells libvirt ``model="none"`` when the option is off, where libvirt
would otherwise add a device of its own); the projection libvirt's `plan` compares includes it; the
argv importer types the device back, the libvirt importer the element; the schema accepts `true`.
So such an option is one field in models.py and one sample in tests/samples.py; ``models.declared()``
lists them. A leaf: it imports nothing of qemuspec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QemuDevice:
    driver: str  # the -device driver
    id: str  # its id, under qemuspec's prefix (qemuspec-ID)
    libvirt: str  # the libvirt element that makes it, e.g. memballoon
    model: str  # that element's model attribute when the option is on
    off: str | None = (
        None  # the model attribute to write when it is off (libvirt adds one by default)
    )
    attributes: tuple[
        tuple[str, str], ...
    ] = ()  # boolean -device property -> the element's on/off attribute
