// Asking before a press that loses the user's work.

import { Dialog, showDialog } from '@jupyterlab/apputils';

/**
 * Ask `question` in JupyterLab's own dialog, `body` under it; resolves true
 * only when the user presses `act` (Cancel and Escape keep everything).
 */
export async function confirmLoss(
  question: string,
  body: string,
  act: string
): Promise<boolean> {
  const answer = await showDialog({
    title: question,
    body,
    buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: act })],
    defaultButton: 0
  });
  return answer.button.accept;
}
