// An autocollect collector plugin written in JavaScript, built into a
// WASI preview 2 component by componentize-js (StarlingMonkey).
//
// It writes one zip of diagnostics about its own run. StarlingMonkey
// gives JavaScript no filesystem API, so the zip is written by the host
// through the `archive` import (since 0.1.4): the plugin hands it bytes,
// the host deflates them (and encrypts them, WinZip AES-256, when the
// request gives an `encryption-password`) into the output directory.
// Entries:
//
// - `report.txt`: the job context, the options and the start request's
//   parameters (secrets masked), for a person;
// - `context.json`: the same, for a program;
// - `runtime.txt`: the engine that ran it.
//
// Options (all optional):
//
// | key | meaning |
// | --- | --- |
// | `note` | a line of text (1 to 200 bytes) copied into the report |
// | `fail-with` | a non-zero status code: fail as a wrapped tool would |
//
// Build: see README.md (`npm run build`).
//
// How componentize-js maps the WIT: interface functions are camelCase,
// records are objects with camelCase fields, enums are strings ('info'),
// variants are `{ tag, val }`, `u64` is a BigInt, `option<T>` is the value
// or `undefined`. An export returning `result<T, E>` returns T for `ok`
// and throws E for `err`; an import that returns `err(e)` throws an
// error whose `payload` is e.

import { log } from 'autocollect:plugin/log@0.1.5';
import { report } from 'autocollect:plugin/progress@0.1.5';
import { parameters } from 'autocollect:plugin/task@0.1.5';
import { grants } from 'autocollect:plugin/inputs@0.1.5';
import { limits } from 'autocollect:plugin/budget@0.1.5';
import { Archive } from 'autocollect:plugin/archive@0.1.5';

const KNOWN_OPTIONS = ['note', 'fail-with'];
// Start parameters that are secrets: never logged, masked in the report.
const SECRET_PARAMETERS = ['log-redaction-salt', 'encryption-password'];

const invalid = (key, message) => ({ tag: 'invalid-option', val: { key, message } });
const internal = (message) => ({ tag: 'internal', val: message });

// Check every option; reject unknown keys so typos surface at start.
function parseOptions(options) {
  const settings = { note: undefined, failWith: undefined };
  for (const [key, value] of options) {
    if (key === 'note') {
      if (value.length === 0 || new TextEncoder().encode(value).length > 200 || value.includes('\n')) {
        throw invalid(key, 'must be 1 to 200 bytes on one line');
      }
      settings.note = value;
    } else if (key === 'fail-with') {
      const code = /^\s*-?\d+\s*$/.test(value) ? Number(value.trim()) : 0;
      if (code === 0 || code < -(2 ** 31) || code >= 2 ** 31) {
        throw invalid(key, `must be a non-zero 32-bit integer, got ${JSON.stringify(value)}`);
      }
      settings.failWith = code;
    } else {
      throw invalid(key, `unknown option (known: ${KNOWN_OPTIONS.join(', ')})`);
    }
  }
  return settings;
}

// `collectinfo-YYYY-MM-DDTHHMMSS-NODE.zip` in UTC, as cbcollect_info names it.
function zipName(node, now, redacted) {
  const stamp = now.toISOString().slice(0, 19).replace(/:/g, '');
  return `collectinfo-${stamp}-${node.replace(/:/g, '-')}${redacted ? '-redacted' : ''}.zip`;
}

// What an import's error says, whatever its shape.
function reason(e) {
  const payload = e && e.payload !== undefined ? e.payload : e;
  if (payload && typeof payload === 'object' && 'tag' in payload) {
    return `${payload.tag}: ${payload.val}`;
  }
  return String(payload);
}

function collectRun(request) {
  const settings = parseOptions(request.options);
  const ctx = request.context;
  log('info', `js collector: task ${ctx.taskId} on node ${ctx.node}`);

  if (settings.failWith !== undefined) {
    throw {
      tag: 'failed',
      val: {
        statusCode: settings.failWith,
        output: `js collector: failing with status ${settings.failWith} as configured\n`,
      },
    };
  }

  // The start request's parameters: reading them tells the host this
  // collector saw what the request asked for (redaction, encryption).
  const params = parameters();
  const param = (key) => params.find(([k]) => k === key)?.[1];
  const redacted = param('log-redaction-level') === 'partial';
  const password = param('encryption-password');
  const lim = limits();
  const now = new Date();

  const masked = params.map(([k, v]) => [k, SECRET_PARAMETERS.includes(k) ? '***' : v]);
  const context = {
    language: 'javascript',
    runtime: 'StarlingMonkey (componentize-js)',
    task_id: ctx.taskId,
    node: ctx.node,
    output_dir: request.outputDir,
    options: request.options.map(([k, v]) => [k, v]),
    parameters: masked,
    grants: grants().map((g) => [g.name, g.guestPath]),
    // u64 values arrive as BigInt, which JSON cannot hold: as numbers
    // (exact up to 2^53) or, past that, as text.
    limits: {
      deadline_ms: Number(lim.deadlineMs),
      max_bytes: safeNumber(lim.maxBytes),
      max_files: safeNumber(lim.maxFiles),
    },
    note: settings.note ?? null,
    collected_unix: Math.floor(now.getTime() / 1000),
  };
  const reportText = [
    'autocollect js collector',
    `task: ${ctx.taskId}`,
    `node: ${ctx.node}`,
    `output dir: ${request.outputDir}`,
    `note: ${settings.note ?? '-'}`,
    'options:',
    ...context.options.map(([k, v]) => `  ${k} = ${v}`),
    'parameters:',
    ...masked.map(([k, v]) => `  ${k} = ${v}`),
    `deadline in: ${lim.deadlineMs} ms`,
    '',
  ].join('\n');
  const utf8 = new TextEncoder();
  const entries = [
    ['report.txt', utf8.encode(reportText)],
    ['context.json', utf8.encode(JSON.stringify(context, null, 2) + '\n')],
    ['runtime.txt', utf8.encode(`${context.runtime}\n`)],
  ];

  const name = zipName(ctx.node, now, redacted);
  const mtime = BigInt(context.collected_unix);
  let artifact;
  try {
    const zip = Archive.create(name, {
      compression: { tag: 'deflate', val: 6 },
      password,
      maxEntryBytes: undefined,
    });
    entries.forEach(([entry, data], i) => {
      zip.addBytes(entry, data, mtime);
      log('debug', `js collector: added ${entry} (${data.length} bytes)`);
      report(BigInt(i + 1), BigInt(entries.length), `added ${entry}`);
    });
    artifact = zip.finish();
  } catch (e) {
    throw internal(`writing ${name} with the host's archive: ${reason(e)}`);
  }

  const summary = `wrote ${artifact.name} (${artifact.size} bytes, ${entries.length} entries)`;
  log('info', `js collector: ${summary}`);
  return { artifacts: [artifact], summary };
}

function safeNumber(big) {
  return big <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(big) : big.toString();
}

// The `autocollect:plugin/collect` export.
export const collect = {
  validateOptions(options) {
    parseOptions(options);
  },
  collect: collectRun,
};
