"""A minimal oVirt-style OVF (``ovf:Envelope``) for a fake VM (API-NOTES § 3, § 11.3).

The real engine serves the VM's OVF in ``vm.initialization.configuration`` (type ``ovf``) when
``all_content=true``; a snapshot keeps the OVF of the VM at its creation. This one carries what
a restore needs and what the engine's OVF writer (``OvfVmWriter``) puts in the same places:
the name and id, CPU topology, memory, OS type, one NIC item per NIC (a seed with none gets
``nic1``) and one disk item per disk (disk id, volume id, format, interface, bootable, size).
It is generated, not parsed back: nothing in the fake reads it.
"""

import xml.etree.ElementTree as ET
from collections.abc import Mapping

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
