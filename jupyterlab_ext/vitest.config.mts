import { fileURLToPath } from 'node:url';

import { defineConfig } from 'vitest/config';

const modules = (name: string): string =>
  fileURLToPath(new URL(`./node_modules/${name}`, import.meta.url));

// The tests live with the other tests, in tests/jupyterlab_ext/; the packages
// they import themselves (React, to render views) come from here.
export default defineConfig({
  resolve: {
    alias: [
      { find: /^react$/, replacement: modules('react') },
      { find: /^@lumino\/signaling$/, replacement: modules('@lumino/signaling') },
      { find: /^react-dom\/server$/, replacement: modules('react-dom/server.js') }
    ]
  },
  test: {
    root: '..',
    include: ['tests/jupyterlab_ext/**/*.test.ts'],
    environment: 'node',
    globals: true,
    testTimeout: 10000
  }
});
