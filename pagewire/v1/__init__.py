"""Generated protobuf and gRPC stubs for pagewire.v1 (do not edit; see pagewire.protogen)."""
