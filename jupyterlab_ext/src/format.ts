/** Numbers as the sidebar shows them; `null` shows as an en dash. */

const DASH = '–';

export function formatBytes(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return DASH;
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let size = value;
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  const digits = unit === 0 || size >= 100 ? 0 : 1;
  return `${size.toFixed(digits)} ${units[unit]}`;
}

/** A duration in seconds: `42 s`, `5 min`, `2 h 5 min`, `3 d 4 h`. */
export function formatDuration(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return DASH;
  }
  const s = Math.max(0, Math.round(value));
  if (s < 60) {
    return `${s} s`;
  }
  const m = Math.floor(s / 60);
  if (m < 60) {
    return `${m} min`;
  }
  const h = Math.floor(m / 60);
  if (h < 24) {
    return m % 60 ? `${h} h ${m % 60} min` : `${h} h`;
  }
  const d = Math.floor(h / 24);
  return h % 24 ? `${d} d ${h % 24} h` : `${d} d`;
}

export function formatPercent(value: number | null | undefined): string {
  if (value === null || value === undefined || !Number.isFinite(value)) {
    return DASH;
  }
  return `${Math.round(value)}%`;
}

/** `value` out of `total` as a fraction in [0, 1], or `null` if unknown. */
export function fraction(
  value: number | null | undefined,
  total: number | null | undefined
): number | null {
  if (
    value === null ||
    value === undefined ||
    total === null ||
    total === undefined ||
    !Number.isFinite(value) ||
    !Number.isFinite(total) ||
    total <= 0
  ) {
    return null;
  }
  return Math.min(1, Math.max(0, value / total));
}

/**
 * `text` cut in two for a middle ellipsis: the head may shrink (CSS cuts it
 * with `…`) while the tail, its last `tail` characters, always shows; a
 * URL keeps its scheme and host's start on the left and its port on the right.
 */
export function splitMiddle(text: string, tail = 14): [string, string] {
  const keep = Math.min(tail, Math.floor(text.length / 2));
  return [text.slice(0, text.length - keep), text.slice(text.length - keep)];
}

/** The file name of a notebook path (`/`- or `\`-separated); the path if none. */
export function baseName(path: string): string {
  const parts = path.split(/[/\\]/).filter(part => part.length > 0);
  return parts.length > 0 ? parts[parts.length - 1] : path;
}

/** How many characters at the end of a notebook's name always show (its number and `.ipynb`). */
export const NAME_TAIL = 10;

/**
 * A notebook's file name cut for a middle ellipsis: `Untitled12.ipynb` keeps
 * `12.ipynb` in view however narrow the sidebar, where an ellipsis at the
 * end left `Untitled…` for every new notebook.
 */
export function splitName(name: string): [string, string] {
  return splitMiddle(name, NAME_TAIL);
}

/** The title over a server's slots: what they are (GPUs, CPU slots, or both). */
export function slotsTitle(kinds: string[]): string {
  if (kinds.length > 0 && kinds.every(kind => kind === 'gpu')) {
    return 'GPUs';
  }
  if (kinds.length > 0 && kinds.every(kind => kind === 'cpu')) {
    return 'CPU slots';
  }
  return 'Slots';
}
