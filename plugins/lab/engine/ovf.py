"""A minimal oVirt-style OVF (``ovf:Envelope``) for a fake VM (API-NOTES § 3, § 11.3).

The real engine serves the VM's OVF in ``vm.initialization.configuration`` (type ``ovf``) when
``all_content=true``; a snapshot keeps the OVF of the VM at its creation. This one carries what
a restore needs and what the engine's OVF writer (``OvfVmWriter``) puts in the same places:
the name and id, CPU topology, memory, OS type, one NIC item per NIC (a seed with none gets
``nic1``) and one disk item per disk (disk id, volume id, format, interface, bootable, size).
``parse_ovf`` reads such an envelope back (what ``POST vms`` from an OVF needs, § 8.3):
the fields above, from the places this module writes them, which are where the engine's
writer puts them too.
"""

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass

from plugins.lab.engine.state import Attachment, Disk, Inventory, Vm, lab_id

OVF = "http://schemas.dmtf.org/ovf/envelope/1/"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
MiB = 1024**2
GiB = 1024**3

for _prefix, _uri in (("ovf", OVF), ("rasd", RASD), ("vssd", VSSD), ("xsi", XSI)):
    ET.register_namespace(_prefix, _uri)


def _q(ns: str, tag: str) -> str:
    return f"{{{ns}}}{tag}"


def _item(parent: ET.Element, fields: Mapping[str, str]) -> None:
    item = ET.SubElement(parent, "Item")
    for tag, text in fields.items():
        ET.SubElement(item, _q(RASD, tag)).text = text


def vm_ovf(inv: Inventory, vm: Vm, volumes: Mapping[str, str] | None = None) -> str:
    """The OVF text of ``vm``; ``volumes`` maps disk ids to the volume id to name (the active
    volume, i.e. ``Disk.image_id``, for disks not in it)."""
    volumes = volumes or {}
    env = ET.Element(_q(OVF, "Envelope"), {_q(OVF, "version"): "4.4.0.0"})
    refs = ET.SubElement(env, "References")
    disks: list[tuple[Disk, str]] = []
    for a in vm.attachments:
        d = inv.disks[a.disk_id]
        if d.storage_type != "image":
            continue  # a direct LUN is a device of the VM, not an OVF disk
        volume = volumes.get(d.id, d.image_id)
        disks.append((d, volume))
        ET.SubElement(refs, "File", {_q(OVF, "href"): f"{d.id}/{volume}", _q(OVF, "id"): volume})
    nets = ET.SubElement(env, "Section", {_q(XSI, "type"): "ovf:NetworkSection_Type"})
    ET.SubElement(nets, "Info").text = "List of networks"
    ET.SubElement(nets, "Network", {_q(OVF, "name"): "ovirtmgmt"})
    disk_section = ET.SubElement(env, "Section", {_q(XSI, "type"): "ovf:DiskSection_Type"})
    ET.SubElement(disk_section, "Info").text = "List of Virtual Disks"
    for d, volume in disks:
        ET.SubElement(
            disk_section,
            "Disk",
            {
                _q(OVF, "diskId"): volume,
                _q(OVF, "size"): str(-(-d.provisioned_size // GiB)),
                _q(OVF, "fileRef"): f"{d.id}/{volume}",
                _q(OVF, "format"): "http://www.vmware.com/specifications/vmdk.html#sparse",
                _q(OVF, "volume-format"): "COW" if d.format == "cow" else "RAW",
                _q(OVF, "volume-type"): "Sparse" if d.sparse else "Preallocated",
                _q(OVF, "disk-alias"): d.alias,
                _q(OVF, "boot"): str(_attachment(vm, d.id).bootable).lower(),
                _q(OVF, "disk-interface"): _attachment(vm, d.id).interface.upper(),
            },
        )
    content = ET.SubElement(
        env, "Content", {_q(OVF, "id"): "out", _q(XSI, "type"): "ovf:VirtualSystem_Type"}
    )
    ET.SubElement(content, "Name").text = vm.name
    ET.SubElement(content, "TemplateId").text = "00000000-0000-0000-0000-000000000000"
    ET.SubElement(content, "ClusterName").text = inv.clusters[vm.cluster_id].name
    os_section = ET.SubElement(
        content,
        "Section",
        {_q(OVF, "id"): vm.id, _q(OVF, "required"): "false"}
        | {_q(XSI, "type"): "ovf:OperatingSystemSection_Type"},
    )
    ET.SubElement(os_section, "Info").text = "Guest Operating System"
    ET.SubElement(os_section, "Description").text = vm.os_type
    hw = ET.SubElement(content, "Section", {_q(XSI, "type"): "ovf:VirtualHardwareSection_Type"})
    ET.SubElement(hw, "Info").text = f"{vm.sockets * vm.cores} CPU, {vm.memory // MiB} Memory"
    _item(
        hw,
        {
            "Caption": f"{vm.sockets * vm.cores} virtual cpu",
            "InstanceId": "1",
            "ResourceType": "3",
            "num_of_sockets": str(vm.sockets),
            "cpu_per_socket": str(vm.cores),
            "threads_per_cpu": "1",
        },
    )
    _item(
        hw,
        {
            "Caption": f"{vm.memory // MiB} MB of memory",
            "InstanceId": "2",
            "ResourceType": "4",
            "AllocationUnits": "MegaBytes",
            "VirtualQuantity": str(vm.memory // MiB),
        },
    )
    for d, volume in disks:
        _item(
            hw,
            {
                "Caption": d.alias,
                "InstanceId": volume,
                "ResourceType": "17",
                "HostResource": f"{d.id}/{volume}",
                "Parent": "00000000-0000-0000-0000-000000000000",
                "Template": "00000000-0000-0000-0000-000000000000",
                "ApplicationList": "",
                "StorageId": d.storage_domain_id,
            },
        )
    for i, nic in enumerate(vm.nics):
        _item(
            hw,
            {
                "Caption": f"Ethernet adapter on ovirtmgmt ({nic})",
                "InstanceId": lab_id("nic", f"{vm.name}/{nic}"),
                "ResourceType": "10",
                "ResourceSubType": "3",
                "Connection": "ovirtmgmt",
                "Name": nic,
                "MACAddress": f"56:6f:1a:2b:{i // 256:02x}:{i % 256:02x}",
                "speed": "1000",
            },
        )
    return ET.tostring(env, encoding="unicode", xml_declaration=True)


def _attachment(vm: Vm, disk_id: str) -> Attachment:
    return next(a for a in vm.attachments if a.disk_id == disk_id)


@dataclass(frozen=True, slots=True)
class OvfDisk:
    disk_id: str
    alias: str
    interface: str  # the REST spelling: "virtio_scsi", "virtio", "sata"…
    bootable: bool


@dataclass(frozen=True, slots=True)
class OvfVm:
    """What ``parse_ovf`` takes from an envelope; None where the OVF says nothing."""

    vm_id: str | None
    name: str | None
    os_type: str | None
    memory: int | None  # bytes
    sockets: int | None
    cores: int | None
    nics: tuple[str, ...]
    disks: tuple[OvfDisk, ...]


def parse_ovf(text: str) -> OvfVm:
    """Read an ``ovf:Envelope`` (as ``vm_ovf`` writes it). Raises ``ValueError`` for text
    that is not XML or not an envelope; missing fields come back as None."""
    try:
        env = ET.fromstring(text)  # noqa: S314 - the lab's own OVF, from a loopback client
    except ET.ParseError as e:
        raise ValueError(f"the OVF is not XML: {e}") from None
    if env.tag != _q(OVF, "Envelope"):
        raise ValueError(f"the OVF root is {env.tag}, not ovf:Envelope")
    content = env.find("Content")
    hw = None
    os_section = None
    disks: list[OvfDisk] = []
    for section in env.iter("Section"):
        kind = section.get(_q(XSI, "type"))
        if kind == "ovf:VirtualHardwareSection_Type":
            hw = section
        elif kind == "ovf:OperatingSystemSection_Type":
            os_section = section
        elif kind == "ovf:DiskSection_Type":
            for d in section.iter("Disk"):
                disks.append(
                    OvfDisk(
                        disk_id=(d.get(_q(OVF, "fileRef")) or "").split("/")[0],
                        alias=d.get(_q(OVF, "disk-alias")) or "",
                        interface=(d.get(_q(OVF, "disk-interface")) or "virtio").lower(),
                        bootable=d.get(_q(OVF, "boot")) == "true",
                    )
                )
    memory = sockets = cores = None
    nics: list[str] = []
    for item in hw.iter("Item") if hw is not None else ():
        kind = item.findtext(_q(RASD, "ResourceType"))
        if kind == "3":
            sockets = _int(item.findtext(_q(RASD, "num_of_sockets")))
            cores = _int(item.findtext(_q(RASD, "cpu_per_socket")))
        elif kind == "4":
            mib = _int(item.findtext(_q(RASD, "VirtualQuantity")))
            memory = mib * MiB if mib is not None else None
        elif kind == "10":
            nics.append(item.findtext(_q(RASD, "Name")) or f"nic{len(nics) + 1}")
    return OvfVm(
        vm_id=os_section.get(_q(OVF, "id")) if os_section is not None else None,
        name=content.findtext("Name") if content is not None else None,
        os_type=os_section.findtext("Description") if os_section is not None else None,
        memory=memory,
        sockets=sockets,
        cores=cores,
        nics=tuple(nics),
        disks=tuple(disks),
    )


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None
