// The pagewire.v1.Generation service, built at run time from the .proto files. No generated code:
// the client follows the contract in protos/ as it stands in this checkout, and a field added
// there is usable here without a build step.

import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

export const DEFAULT_PROTOS = fileURLToPath(new URL("../../protos", import.meta.url));

const LOADER_OPTIONS = {
  keepCase: true, // snake_case field names, as in the .proto and in every other pagewire client
  longs: String, // a uint64 seed above 2^53 survives the round trip
  enums: String, // "FINISH_REASON_LENGTH" rather than 2
  defaults: true, // absent fields read as their proto3 defaults, so every message has one shape
  oneofs: true,
};

/** A Generation client for `address` (host:port, plaintext). */
export function generationClient(address, protosDir = DEFAULT_PROTOS) {
  const definition = protoLoader.loadSync("pagewire/v1/generation.proto", {
    ...LOADER_OPTIONS,
    includeDirs: [protosDir],
  });
  const { Generation } = grpc.loadPackageDefinition(definition).pagewire.v1;
  return new Generation(address, grpc.credentials.createInsecure());
}

/**
 * Call metadata carrying the API key. Sent per call rather than as call credentials because
 * grpc-js only attaches call credentials to TLS channels, and the router also listens in plaintext.
 */
export function authMetadata(apiKey) {
  const metadata = new grpc.Metadata();
  if (apiKey) metadata.set("authorization", `Bearer ${apiKey}`);
  return metadata;
}

/** The name of a gRPC status code ("INVALID_ARGUMENT"), which is what a user can look up. */
export function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? `CODE_${code}`;
}
