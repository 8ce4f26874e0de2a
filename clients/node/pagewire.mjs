#!/usr/bin/env node
// Command-line client for the pagewire router: streams a completion (text or chat prompt) to
// stdout as it arrives, or lists the served models. See README.md for the flags.

import { parseArgs } from "node:util";

import { authMetadata, DEFAULT_PROTOS, generationClient, statusName } from "./generation.mjs";

const USAGE = `usage: pagewire.mjs [options] PROMPT
       pagewire.mjs [options] --chat ROLE:CONTENT...
       pagewire.mjs [options] --list-models
options: --addr HOST:PORT  --api-key KEY  --model NAME  --max-tokens N  --temperature T
         --top-p P  --top-k K  --seed S  --stop STR (repeatable)  --ignore-eos  --json
         --protos DIR`;

const OPTIONS = {
  addr: { type: "string", default: process.env.PAGEWIRE_ADDR ?? "127.0.0.1:50051" },
  "api-key": { type: "string", default: process.env.PAGEWIRE_API_KEY ?? "" },
  model: { type: "string", default: "" },
  "max-tokens": { type: "string" },
  temperature: { type: "string" },
  "top-p": { type: "string" },
  "top-k": { type: "string" },
  seed: { type: "string" },
  stop: { type: "string", multiple: true, default: [] },
  "ignore-eos": { type: "boolean", default: false },
  chat: { type: "boolean", default: false },
  "list-models": { type: "boolean", default: false },
  json: { type: "boolean", default: false },
  protos: { type: "string", default: DEFAULT_PROTOS },
  help: { type: "boolean", default: false },
};

class UsageError extends Error {}

// Flag values are only parsed here, never range-checked: the router owns every bound and names
// the offending field in its INVALID_ARGUMENT, so a second copy of the rules would only drift.
function number(flag, value, pattern) {
  if (!pattern.test(value)) throw new UsageError(`--${flag}: not a number: ${value}`);
  return Number(value);
}
const INT = /^[-+]?\d+$/;
const FLOAT = /^[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$/i;

/** SamplingParams with only the fields the user gave: unset fields keep the router's defaults. */
function samplingParams(values) {
  const sampling = { stop: values.stop, ignore_eos: values["ignore-eos"] };
  const fields = [
    ["max-tokens", "max_tokens", INT],
    ["temperature", "temperature", FLOAT],
    ["top-p", "top_p", FLOAT],
    ["top-k", "top_k", INT],
  ];
  for (const [flag, field, pattern] of fields) {
    if (values[flag] !== undefined) sampling[field] = number(flag, values[flag], pattern);
  }
  if (values.seed !== undefined) {
    // Kept as a string: a uint64 does not fit a JavaScript number.
    if (!/^\d+$/.test(values.seed)) throw new UsageError(`--seed: not a uint64: ${values.seed}`);
    sampling.seed = values.seed;
  }
  return sampling;
}

/** "user:Hello" -> {role: "user", content: "Hello"}; the content may itself contain colons. */
function chatMessage(arg) {
  const colon = arg.indexOf(":");
  if (colon <= 0) throw new UsageError(`--chat: expected ROLE:CONTENT, got ${JSON.stringify(arg)}`);
  return { role: arg.slice(0, colon), content: arg.slice(colon + 1) };
}

function generateRequest(values, positionals) {
  const request = { model: values.model, sampling: samplingParams(values) };
  if (values.chat) {
    if (positionals.length === 0) throw new UsageError("--chat needs at least one ROLE:CONTENT");
    request.chat = { messages: positionals.map(chatMessage) };
  } else {
    if (positionals.length !== 1) throw new UsageError("expected exactly one PROMPT argument");
    request.text = positionals[0];
  }
  return request;
}

function reportError(err) {
  process.stderr.write(`error: ${statusName(err.code)}: ${err.details}\n`);
  process.exitCode = 1;
}

/**
 * The last message's finish reason and usage, in the Python CLI's words. It goes to stderr, after a
 * newline, so that stdout holds exactly the completion's text.
 */
function summary(last) {
  const reason = last.finish_reason.replace(/^FINISH_REASON_/, "").toLowerCase();
  const u = last.usage ?? {};
  const stop = last.stop_string ? `, stop string ${JSON.stringify(last.stop_string)}` : "";
  return `\n[${reason}: prompt ${u.prompt_tokens} tokens (${u.cached_tokens} cached), ` +
    `completion ${u.completion_tokens} tokens${stop}]\n`;
}

function generate(client, metadata, request, json) {
  const call = client.Generate(request, metadata);
  // Ctrl-C cancels the call, and the router aborts the request downstream.
  process.once("SIGINT", () => call.cancel());
  let last = null;
  call.on("data", (response) => {
    last = response;
    process.stdout.write(json ? `${JSON.stringify(response)}\n` : response.text);
  });
  call.on("end", () => {
    if (!json && last) process.stderr.write(summary(last));
  });
  call.on("error", reportError);
  // "status" comes last, after "end" or "error": the channel is no longer needed.
  call.on("status", () => client.close());
}

function listModels(client, metadata, json) {
  client.ListModels({}, metadata, (err, response) => {
    client.close();
    if (err) return reportError(err);
    if (json) return process.stdout.write(`${JSON.stringify(response)}\n`);
    for (const m of response.models) {
      const line = [m.name, `max_model_len=${m.max_model_len}`, `vocab_size=${m.vocab_size}`];
      process.stdout.write(`${line.join("\t")}\n`);
    }
  });
}

function main(argv) {
  const { values, positionals } = parseArgs({
    args: argv, options: OPTIONS, allowPositionals: true,
  });
  if (values.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const request = values["list-models"] ? null : generateRequest(values, positionals);
  const client = generationClient(values.addr, values.protos);
  const metadata = authMetadata(values["api-key"]);
  if (request === null) listModels(client, metadata, values.json);
  else generate(client, metadata, request, values.json);
}

try {
  main(process.argv.slice(2));
} catch (err) {
  // parseArgs reports bad flags as TypeErrors carrying an ERR_PARSE_ARGS_* code.
  if (!(err instanceof UsageError) && !String(err.code).startsWith("ERR_PARSE_ARGS")) throw err;
  process.stderr.write(`${err.message}\n${USAGE}\n`);
  process.exitCode = 2;
}
