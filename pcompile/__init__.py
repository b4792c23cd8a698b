"""pcompile: turn a single-device PyTorch training model into a multi-device program."""
from pcompile.api import compile, estimate, fingerprint, plan
from pcompile.cluster import Cluster, Device, NodeGroup
from pcompile.cost.profile import profile_cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR, NodeMeta
from pcompile.launch import init_distributed, launch
from pcompile.plan import Candidate, Estimate, LayerAssignment, Plan, Strategy

__all__ = ["compile", "plan", "estimate", "fingerprint", "launch", "init_distributed", "profile_cluster", "Cluster",
           "Device", "NodeGroup", "PcompileError", "IR", "NodeMeta", "Plan", "Strategy", "Estimate", "Candidate",
           "LayerAssignment"]
