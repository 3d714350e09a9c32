// Text on one line that, where it does not fit, is cut in the middle.

import React from 'react';

import { splitMiddle } from './format';

/**
 * `text` on one line, cut in the middle with `…` where it does not fit (its
 * head shrinks, its tail stays), and whole on hover. `split` says where the
 * tail begins (default: a URL's, see `splitMiddle`).
 */
export function MiddleEllipsis({
  text,
  className,
  split = splitMiddle
}: {
  text: string;
  className: string;
  split?: (text: string) => [string, string];
}): JSX.Element {
  const [head, tail] = split(text);
  return (
    <span className={`jp-RemoteGpu-middle ${className}`} title={text}>
      <span className="jp-RemoteGpu-middleHead">{head}</span>
      <span className="jp-RemoteGpu-middleTail">{tail}</span>
    </span>
  );
}
