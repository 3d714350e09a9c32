import { defineConfig } from 'vitest/config';

// The tests live with the other tests, in tests/jupyterlab_ext/.
export default defineConfig({
  test: {
    root: '..',
    include: ['tests/jupyterlab_ext/**/*.test.ts'],
    environment: 'node',
    globals: true,
    testTimeout: 10000
  }
});
