import type { IProblem, ProblemReason } from './types';

const REASONS: ReadonlySet<string> = new Set<ProblemReason>([
  'bad-url',
  'no-token',
  'unreachable',
  'unauthorized',
  'not-found',
  'conflict',
  'server-error'
]);

/** A failed call, carrying what the server extension said and what to do. */
export class RemoteGpuError extends Error {
  constructor(readonly problem: IProblem) {
    super(problem.message);
    this.name = 'RemoteGpuError';
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null;
}

function text(value: unknown): string {
  return typeof value === 'string' ? value : '';
}

/** Turn an error answer of the server extension into an `IProblem`. */
export function problemFrom(status: number, body: unknown): IProblem {
  if (isRecord(body) && REASONS.has(text(body.reason))) {
    return {
      reason: text(body.reason) as ProblemReason,
      message: text(body.message),
      hint: text(body.hint),
      url: text(body.url)
    };
  }
  const message = isRecord(body) ? text(body.message) : '';
  return {
    reason: 'jupyter',
    message: `The Jupyter server answered ${status}${message ? `: ${message}` : ''}.`,
    hint:
      status === 404
        ? 'The remote_gpu_lab server extension is not enabled: run `jupyter server extension enable remote_gpu_lab` and restart JupyterLab.'
        : 'Reload the page; if that does not help, look at the JupyterLab log.',
    url: ''
  };
}

/** What to show for any error: a `RemoteGpuError`'s problem, or a generic one. */
export function problemOf(error: unknown): IProblem {
  if (error instanceof RemoteGpuError) {
    return error.problem;
  }
  return {
    reason: 'jupyter',
    message: error instanceof Error ? error.message : String(error),
    hint: 'Reload the page; if that does not help, look at the JupyterLab log.',
    url: ''
  };
}
