"""pcompile: turn a single-device PyTorch training model into a multi-device program."""
from pcompile.api import compile, estimate, fingerprint, plan
from pcompile.cluster import Cluster, Device, NodeGroup
from pcompile.cost.profile import profile_cluster
from pcompile.errors import PcompileError
from pcompile.ir import IR, NodeMeta
from pcompile.launch import init_distributed, launch
from pcompile.plan import Candidate, Estimate, LayerAssignment, Plan, Strategy
from pcompile.runtime.materialise import init_model_weights as init_weights

__all__ = ["compile", "plan", "estimate", "init_weights", "fingerprint", "launch", "init_distributed",
           "profile_cluster", "Cluster", "Device", "NodeGroup", "PcompileError", "IR", "NodeMeta", "Plan", "Strategy",
           "Estimate", "Candidate", "LayerAssignment"]
